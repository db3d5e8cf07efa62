"""rledit-plugin: RLEdit (Reinforced Lifelong Editing) for EasyEdit."""
__version__ = "0.1.0"
