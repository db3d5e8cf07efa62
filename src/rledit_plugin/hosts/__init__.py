"""Hosts: the toolkits RLEdit plugs into (EasyEdit: :mod:`.easyedit`)."""
