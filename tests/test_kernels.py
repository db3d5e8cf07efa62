"""Delta-application kernels against a float64 reference.

The Triton kernel runs on CPU tensors under Triton's interpreter: the
``interpreter`` fixture sets TRITON_INTERPRET=1 before the kernel is first
decorated (``triton_path.get_kernel`` decorates lazily, per value of the
variable). Tests needing triton skip only when it is not importable. The
``cuda`` tests compile the real kernel and run where a GPU is present.
"""
import pytest
import torch

from rledit_plugin.kernels import (
    ACCUMULATE_MODES, apply_low_rank_, apply_low_rank_grouped_, make_residual,
    resolve_path, triton_available, update_survival,
)
from rledit_plugin.kernels.torch_path import apply_low_rank_torch_

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "strided")
RANKS = (1, 7, 64, 1024)


@pytest.fixture
def interpreter(monkeypatch):
    if not triton_available():
        pytest.skip("triton is not importable")
    pytest.importorskip("numpy")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_weight(m, k, dtype, layout, gen, device="cpu"):
    """(W, storage): W is an (m, k) view in the requested layout over ``storage``."""
    if layout == "contiguous":
        storage = torch.randn(m, k, generator=gen).to(device, dtype)
        return storage, storage
    if layout == "transposed":  # GPT-2 Conv1D: (d_in, d_out) storage seen as (d_out, d_in)
        storage = torch.randn(k, m, generator=gen).to(device, dtype)
        return storage.t(), storage
    storage = torch.randn(m, k + 9, generator=gen).to(device, dtype)  # row stride > k
    return storage[:, 4:4 + k], storage


def make_factors(m, k, n, gen, dtype=torch.float32, device="cpu", scale=1.0):
    left = (torch.randn(m, n, generator=gen, dtype=torch.float64) * scale / n ** 0.5)
    right = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return left.to(device, dtype), right.to(device, dtype)


def reference(weight, left, right, alpha, residual=None):
    ref = weight.double() + alpha * (left.double() @ right.double())
    return ref if residual is None else ref + residual.double()


def assert_matches(weight, ref, left, right, alpha, accum_tol=1e-5):
    """Within one ulp of the weight dtype plus fp32-accumulation error of the product."""
    fin = torch.finfo(weight.dtype)
    bound = (fin.eps * ref.abs() + accum_tol * abs(alpha) * (left.double().abs() @ right.double().abs())
             + fin.tiny * fin.eps)
    err = (weight.double() - ref.to(weight.device)).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the allowed bound (max abs err {err.max().item():.3g})"


def run_case(path, dtype, layout, rank, m=33, k=47, factor_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight, storage = make_weight(m, k, dtype, layout, gen)
    left, right = make_factors(m, k, rank, gen, factor_dtype)
    alpha = 0.37
    ref = reference(weight, left, right, alpha)
    before = storage.clone()
    out = apply_low_rank_(weight, left, right, alpha, path=path)
    assert out is weight
    assert_matches(weight, ref, left, right, alpha)
    if layout == "strided":  # memory beside the view is untouched
        assert torch.equal(storage[:, :4], before[:, :4])
        assert torch.equal(storage[:, 4 + k:], before[:, 4 + k:])


# ---------------------------------------------------------------- torch path
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_matches_fp64(dtype, layout, rank):
    run_case("torch", dtype, layout, rank)


@pytest.mark.parametrize("factor_dtype", (torch.bfloat16, torch.float16, torch.float64), ids=str)
@pytest.mark.parametrize("path", ("torch", "triton"))
def test_factor_dtypes(path, factor_dtype, request):
    if path == "triton":
        request.getfixturevalue("interpreter")
    run_case(path, torch.bfloat16, "contiguous", 7, factor_dtype=factor_dtype)
    run_case(path, torch.float32, "transposed", 64, factor_dtype=factor_dtype)


def test_non_contiguous_factors_and_parameter_weight():
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(47, 33)  # Parameter that requires grad: update under no_grad
    left_t, right_t = make_factors(47, 33, 5, gen)  # transposed storage for the factors
    left, right = right_t.t(), left_t.t()
    ref = reference(lin.weight.detach(), left, right, 2.0)
    apply_low_rank_(lin.weight, left, right, 2.0, path="torch")
    assert_matches(lin.weight.detach(), ref, left, right, 2.0)


def test_conv1d_transposed_view_changes_forward_as_intended():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(nf=12, nx=20)  # weight (d_in=20, d_out=12)
    x = torch.randn(4, 20, dtype=torch.float64)
    y0 = conv.double()(x)
    gen = torch.Generator().manual_seed(2)
    left, right = make_factors(12, 20, 3, gen, torch.float64)
    apply_low_rank_(conv.weight.t(), left, right, 0.5, path="torch")
    expected = y0 + x @ (0.5 * left @ right).t()
    assert torch.allclose(conv(x), expected, atol=1e-12)


def dyadic_factors(m, k, n, gen):
    """Small integers times powers of two: every product and partial sum is exact
    in fp32, so the result cannot depend on how BLAS orders the sums."""
    left = torch.randint(-4, 5, (m, n), generator=gen).float() * 2.0 ** -9
    right = torch.randint(-4, 5, (n, k), generator=gen).float() * 2.0 ** -5
    return left, right


@pytest.mark.parametrize("dtype,res_dtype", [
    (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)], ids=str)
def test_chunked_equals_one_shot(dtype, res_dtype):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(65, 90, generator=gen).to(dtype)
    res0 = None if res_dtype is None else (torch.randn(65, 90, generator=gen) * 1e-3).to(res_dtype)
    left, right = dyadic_factors(65, 90, 16, gen)
    results = []
    for chunk_bytes in (1, 3 * 90 * 4 * 7, 1 << 30):  # 1 row, 7 rows, everything at once
        w = base.clone()
        res = None if res0 is None else res0.clone()
        apply_low_rank_torch_(w, left, right, 0.5, res, chunk_bytes=chunk_bytes)
        results.append((w, res))
    ref = reference(base, left, right, 0.5, res0)
    if res0 is None:
        assert_matches(results[0][0], ref, left, right, 0.5)
    else:  # weight + residual carries the exact sum
        total = results[0][0].double() + results[0][1].double()
        assert (total - ref).abs().max() <= 2e-3 * res0.double().abs().max() + 1e-6 * ref.abs().max()
    for w, res in results[1:]:
        assert torch.equal(w, results[0][0])
        if res is not None:
            assert torch.equal(res, results[0][1])


def test_chunked_random_data_close_to_reference():
    # With arbitrary data BLAS may sum in another order per chunk size; the
    # result stays within the fp64-reference bound for tiny and huge chunks.
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(65, 90, generator=gen).to(torch.bfloat16)
    left, right = make_factors(65, 90, 16, gen)
    ref = reference(base, left, right, 0.8)
    for chunk_bytes in (1, 1 << 30):
        w = base.clone()
        apply_low_rank_torch_(w, left, right, 0.8, None, chunk_bytes=chunk_bytes)
        assert_matches(w, ref, left, right, 0.8)


# --------------------------------------------------------- compensated updates
def spacing(ref, dtype):
    """Distance between neighbouring values of ``dtype`` at |ref| (subnormals included)."""
    fin = torch.finfo(dtype)
    mag = ref.abs().clamp_min(fin.tiny)
    return fin.eps * torch.exp2(torch.floor(torch.log2(mag)))


def many_small_updates(mode, n_updates, path, dtype=torch.bfloat16, rel=3e-4, res_dtype=None):
    """Apply n random rank-2 updates of relative size ``rel`` (each ||dW|| / ||W||)."""
    gen = torch.Generator().manual_seed(0)
    m, k, rank = 32, 48, 2
    w = (torch.randn(m, k, generator=gen, dtype=torch.float64) * 0.05).to(dtype)
    start = w.double()
    ref = start.clone()
    res = make_residual(w, mode)
    if res_dtype is not None:
        res = torch.zeros(m, k, dtype=res_dtype)
    for _ in range(n_updates):
        left = torch.randn(m, rank, generator=gen, dtype=torch.float64)
        right = torch.randn(rank, k, generator=gen, dtype=torch.float64)
        left *= rel * start.norm() / (left @ right).norm()
        ref += left @ right
        apply_low_rank_(w, left.float(), right.float(), 1.0, residual=res, path=path)
    return start, w, res, ref


def test_uncompensated_bf16_loses_small_updates():
    start, w, _, ref = many_small_updates("none", 2000, "torch")
    surv = update_survival(start, w, ref - start)
    assert surv["fraction"] < 0.5 and surv["rel_error"] > 0.5, surv


@pytest.mark.parametrize("mode", ("fp32", "kahan"))
def test_compensated_bf16_keeps_small_updates(mode):
    start, w, res, ref = many_small_updates(mode, 2000, "torch")
    surv = update_survival(start, w, ref - start)
    assert abs(surv["fraction"] - 1.0) < 0.02, surv
    ulps = (w.double() - ref).abs() / spacing(ref, w.dtype)
    if mode == "fp32":  # the stored weight is the fp64 sum rounded to bf16
        assert ulps.max() <= 1.0
        assert torch.allclose(w.double() + res.double(), ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    else:  # bf16 residual: its own rounding leaves a small absolute error
        typical = spacing(torch.tensor(0.05, dtype=torch.float64), w.dtype)
        assert (ulps <= 1.0).float().mean() > 0.95
        assert ((w.double() - ref).abs() <= spacing(ref, w.dtype) + 0.25 * typical).all()


def test_compensated_fp16_with_fp32_residual():
    start, w, res, ref = many_small_updates("fp32", 1000, "torch", dtype=torch.float16, rel=1e-4)
    none_start, none_w, _, _ = many_small_updates("none", 1000, "torch", dtype=torch.float16, rel=1e-4)
    assert ((w.double() - ref).abs() / spacing(ref, w.dtype)).max() <= 1.0
    assert update_survival(none_start, none_w, ref - start)["rel_error"] > 0.3


def test_fp32_weight_kahan_residual():
    # An explicit fp32 residual on an fp32 weight is a Kahan sum: W + residual
    # tracks the fp64 sum closer than plain fp32 accumulation does.
    plain = many_small_updates("none", 500, "torch", dtype=torch.float32, rel=1e-6)
    comp = many_small_updates("none", 500, "torch", dtype=torch.float32, rel=1e-6,
                              res_dtype=torch.float32)
    err_plain = (plain[1].double() - plain[3]).norm()
    err_comp = (comp[1].double() + comp[2].double() - comp[3]).norm()
    assert err_comp < 0.1 * err_plain


@pytest.mark.parametrize("path", ("torch", "triton"))
@pytest.mark.parametrize("res_dtype", (torch.float32, torch.bfloat16), ids=str)
def test_single_compensated_update(path, res_dtype, request):
    if path == "triton":
        request.getfixturevalue("interpreter")
    gen = torch.Generator().manual_seed(6)
    weight, _ = make_weight(33, 47, torch.bfloat16, "transposed", gen)
    res = make_residual(weight, "fp32" if res_dtype == torch.float32 else "kahan")
    res.copy_(torch.randn(33, 47, generator=gen) * 1e-3)
    left, right = make_factors(33, 47, 7, gen, scale=1e-2)
    ref = reference(weight, left, right, 0.7, res)
    apply_low_rank_(weight, left, right, 0.7, residual=res, path=path)
    total = weight.double() + res.double()
    tol = 1e-6 if res_dtype == torch.float32 else 4e-3 * res.double().abs().max().item()
    assert (total - ref).abs().max() <= tol + 1e-5 * ref.abs().max()
    # the weight holds the value, the residual only what bf16 could not store
    assert ((weight.double() - ref).abs() <= spacing(ref, weight.dtype)).all()


# --------------------------------------------------------------- triton path
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_interpreter_matches_fp64(interpreter, dtype, layout, rank):
    run_case("triton", dtype, layout, rank)


def test_triton_interpreter_multi_tile_shape(interpreter):
    # several tiles in both directions plus ragged edges, GPT-2-like transposed view
    run_case("triton", torch.bfloat16, "transposed", 40, m=97, k=130, seed=5)


# bf16x3 represents each fp32 factor by two bf16 parts (~16 significant bits):
# per product |error| <= ~3 * 2^-16 |l r|, accumulated in fp32.
BF16X3_TOL = 6e-5


def test_bf16x3_split_reconstructs_the_product():
    from rledit_plugin.kernels.triton_path import split_bf16x3
    gen = torch.Generator().manual_seed(9)
    left, right = make_factors(40, 70, 13, gen)
    l3, r3 = split_bf16x3(left, right)
    assert l3.dtype == r3.dtype == torch.bfloat16 and l3.shape == (40, 39) and r3.shape == (39, 70)
    err = (l3.double() @ r3.double() - left.double() @ right.double()).abs()
    bound = 3 * 2.0 ** -16 * (left.double().abs() @ right.double().abs())
    assert (err <= bound).all()
    assert err.max() > 0  # and it is not exact: a genuine approximation


@pytest.mark.parametrize("precision", ("outer", "ieee", "tf32x3", "tf32", "bf16x3"))
def test_triton_interpreter_precisions(interpreter, precision):
    from rledit_plugin.kernels.triton_path import apply_low_rank_triton_
    gen = torch.Generator().manual_seed(10)
    weight, _ = make_weight(37, 41, torch.float32, "transposed", gen)
    left, right = make_factors(37, 41, 19, gen)
    ref = reference(weight, left, right, 0.9)
    apply_low_rank_triton_(weight, left, right, 0.9, precision=precision)
    assert_matches(weight, ref, left, right, 0.9, accum_tol=BF16X3_TOL if precision == "bf16x3" else 1e-5)
    with pytest.raises(ValueError, match="precision must be one of"):
        apply_low_rank_triton_(weight, left, right, 0.9, precision="fp8")


def test_triton_default_modes_and_tile_lookup():
    if not triton_available():
        pytest.skip("triton is not importable")
    from rledit_plugin.kernels.triton_path import (
        GPU_CONFIGS, IEEE_MAX_RANK, OUTER_MAX_RANK, dot_mode, nearest_config)
    f32, b16 = torch.zeros(4, 64), torch.zeros(4, 64, dtype=torch.bfloat16)
    bf16 = torch.bfloat16
    assert dot_mode(f32[:, :1], f32[:1], None, bf16) == "outer"
    assert dot_mode(f32[:, :OUTER_MAX_RANK], f32[:OUTER_MAX_RANK], None, torch.float16) == "outer"
    assert dot_mode(f32[:, :OUTER_MAX_RANK + 1], f32[:OUTER_MAX_RANK + 1], None, bf16) == "ieee"
    assert dot_mode(f32[:, :1], f32[:1], None, torch.float32) == "ieee"  # fp32 W: ieee is as fast
    assert dot_mode(f32[:, :1], f32[:1], "ieee", bf16) == "ieee"  # an explicit precision wins
    assert dot_mode(f32[:, :IEEE_MAX_RANK], f32[:IEEE_MAX_RANK], None) == "ieee"
    assert dot_mode(f32[:, :IEEE_MAX_RANK], f32[:IEEE_MAX_RANK], "bf16x3") == "bf16x3"
    assert dot_mode(torch.zeros(4, IEEE_MAX_RANK + 1), torch.zeros(IEEE_MAX_RANK + 1, 4), None) == "tf32x3"
    assert dot_mode(b16, b16.t(), "ieee") == "native16"  # 16-bit factors ignore precision
    points = GPU_CONFIGS["tf32x3"]
    assert nearest_config(points, 1) is points[0][1]
    assert nearest_config(points, 5000) is points[-1][1]
    assert nearest_config(points, 100) is dict(points)[64]  # log2: 100 is nearer 64 than 256


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    if not triton_available():
        pytest.skip("triton is not importable")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        apply_low_rank_(w, torch.ones(4, 1), torch.ones(1, 4), path="triton")


def test_auto_uses_torch_on_cpu():
    assert resolve_path(torch.zeros(2, 2), "auto") == "torch"
    assert resolve_path(torch.zeros(2, 2, dtype=torch.bfloat16), "auto", torch.zeros(2, 2)) == "torch"
    with pytest.raises(ValueError, match="path must be one of"):
        resolve_path(torch.zeros(2, 2), "cuda")


def test_triton_interpreter_compensation_matches_torch(interpreter):
    start, w_tri, res_tri, ref = many_small_updates("fp32", 300, "triton")
    _, w_torch, res_torch, _ = many_small_updates("fp32", 300, "torch")
    assert ((w_tri.double() - ref).abs() / spacing(ref, w_tri.dtype)).max() <= 1.0
    assert torch.allclose(w_tri.double() + res_tri.double(), ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    # both paths round to the same bf16 weights up to near-ties
    assert (w_tri != w_torch).float().mean() < 0.01
    none_start, none_w, _, _ = many_small_updates("none", 300, "triton")
    assert update_survival(none_start, none_w, ref - start)["fraction"] < 0.5


# ------------------------------------------------------------------- grouped
@pytest.mark.parametrize("path", ("torch", "triton"))
def test_grouped_equals_one_by_one(path, request):
    if path == "triton":
        request.getfixturevalue("interpreter")
    gen = torch.Generator().manual_seed(7)
    specs = [(33, 47, torch.bfloat16, "contiguous", 3), (20, 64, torch.float32, "transposed", 5),
             (16, 16, torch.float16, "strided", 1)]
    weights, lefts, rights = [], [], []
    for m, k, dtype, layout, n in specs:
        weights.append(make_weight(m, k, dtype, layout, gen)[0])
        left, right = make_factors(m, k, n, gen)
        lefts.append(left)
        rights.append(right)
    residuals = [make_residual(weights[0], "fp32"), None, make_residual(weights[2], "kahan")]
    alphas = [0.5, -1.0, 2.0]
    singles = [w.clone() for w in weights]
    single_res = [None if r is None else r.clone() for r in residuals]
    for w, l, r, a, res in zip(singles, lefts, rights, alphas, single_res):
        apply_low_rank_(w, l, r, a, residual=res, path=path)
    out = apply_low_rank_grouped_(weights, lefts, rights, alphas, residuals=residuals, path=path)
    assert out is weights
    for w, s in zip(weights, singles):
        assert torch.equal(w, s)
    for r, s in zip(residuals, single_res):
        assert (r is None and s is None) or torch.equal(r, s)


def test_grouped_scalar_alpha_and_validation_before_writing():
    gen = torch.Generator().manual_seed(8)
    w1, w2 = torch.randn(4, 5, generator=gen), torch.randn(3, 5, generator=gen)
    l1, r1 = make_factors(4, 5, 2, gen)
    before = w1.clone()
    with pytest.raises(ValueError, match=r"apply_low_rank_grouped_\[1\]: shapes do not chain"):
        apply_low_rank_grouped_([w1, w2], [l1, l1], [r1, r1], 0.5)
    assert torch.equal(w1, before)  # nothing applied when a later entry is bad
    with pytest.raises(ValueError, match="2 weights, 1 lefts"):
        apply_low_rank_grouped_([w1, w2], [l1], [r1, r1])
    with pytest.raises(ValueError, match="3 alphas for 1 weights"):
        apply_low_rank_grouped_([w1], [l1], [r1], [1.0, 2.0, 3.0])
    ref = reference(w1, l1, r1, 0.5)
    apply_low_rank_grouped_([w1], [l1], [r1], 0.5)
    assert_matches(w1, ref, l1, r1, 0.5)


# ---------------------------------------------------------------- validation
def test_bad_inputs_are_named():
    w = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="shapes do not chain"):
        apply_low_rank_(w, torch.zeros(4, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="left must be 2-D"):
        apply_low_rank_(w, torch.zeros(4), torch.zeros(1, 5))
    with pytest.raises(TypeError, match="weight must be floating point"):
        apply_low_rank_(torch.zeros(4, 5, dtype=torch.int32), torch.zeros(4, 1), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="residual must have the weight's shape"):
        apply_low_rank_(w, torch.zeros(4, 1), torch.zeros(1, 5), residual=torch.zeros(5, 4))
    with pytest.raises(TypeError, match="residual dtype"):
        apply_low_rank_(w.bfloat16(), torch.zeros(4, 1), torch.zeros(1, 5),
                        residual=torch.zeros(4, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="zero stride"):
        apply_low_rank_(torch.zeros(1, 5).expand(4, 5), torch.zeros(4, 1), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="path must be one of"):
        apply_low_rank_(w, torch.zeros(4, 1), torch.zeros(1, 5), path="cuda")


def test_rank_zero_is_a_no_op():
    w = torch.randn(4, 5)
    before = w.clone()
    apply_low_rank_(w, torch.zeros(4, 0), torch.zeros(0, 5))
    assert torch.equal(w, before)


def test_make_residual_modes():
    assert ACCUMULATE_MODES == ("none", "fp32", "kahan")
    bf16 = torch.zeros(6, 4, dtype=torch.bfloat16)
    assert make_residual(bf16, "none") is None
    assert make_residual(torch.zeros(6, 4), "fp32") is None  # fp32 weights need none
    res = make_residual(bf16, "fp32")
    assert res.dtype == torch.float32 and res.shape == (6, 4) and not res.any()
    assert make_residual(bf16, "kahan").dtype == torch.bfloat16
    assert make_residual(bf16.half(), "kahan").dtype == torch.float16
    conv_view = torch.zeros(4, 6, dtype=torch.bfloat16).t()  # Conv1D-style view
    assert make_residual(conv_view, "fp32").stride() == conv_view.stride()
    with pytest.raises(ValueError, match="unknown accumulate mode 'fp64'"):
        make_residual(bf16, "fp64")


def test_update_survival():
    start = torch.zeros(3, 3)
    intended = torch.ones(3, 3)
    assert update_survival(start, intended * 0.5, intended) == {"fraction": 0.5, "rel_error": 0.5}
    with pytest.raises(ValueError, match="intended update is zero"):
        update_survival(start, start, start)


# ------------------------------------------------------------ real GPU (CUDA)
CUDA_RANKS = (1, 7, 64, 300, 1024)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("rank", CUDA_RANKS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_triton_matches_fp64(monkeypatch, dtype, layout, rank):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(rank)
    m, k = 1031, 2053  # many tiles, ragged edges
    weight, storage = make_weight(m, k, dtype, layout, gen, device="cuda")
    left, right = make_factors(m, k, rank, gen, device="cuda")
    ref = reference(weight.cpu(), left.cpu(), right.cpu(), 0.37)
    before = storage.clone()
    assert resolve_path(weight, "auto") == "triton"
    apply_low_rank_(weight, left, right, 0.37)
    torch.cuda.synchronize()
    assert_matches(weight.cpu(), ref, left.cpu(), right.cpu(), 0.37)
    if layout == "strided":
        assert torch.equal(storage[:, :4], before[:, :4]) and torch.equal(storage[:, 4 + k:], before[:, 4 + k:])


@needs_cuda
@needs_triton
@pytest.mark.parametrize("precision", ("outer", "ieee", "tf32x3", "bf16x3"))
@pytest.mark.parametrize("factor_dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_cuda_triton_factor_dtypes_and_precisions(monkeypatch, factor_dtype, precision):
    from rledit_plugin.kernels.triton_path import apply_low_rank_triton_
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.bfloat16, torch.float32):
        weight, _ = make_weight(777, 1500, dtype, "contiguous", gen, device="cuda")
        left, right = make_factors(777, 1500, 96, gen, factor_dtype, device="cuda")
        ref = reference(weight.cpu(), left.cpu(), right.cpu(), -0.6)
        apply_low_rank_triton_(weight, left, right, -0.6, precision=precision)
        torch.cuda.synchronize()
        assert_matches(weight.cpu(), ref, left.cpu(), right.cpu(), -0.6,
                       accum_tol=BF16X3_TOL if precision == "bf16x3" else 1e-5)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("mode", ("fp32", "kahan"))
def test_cuda_compensated_updates(monkeypatch, mode):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(12)
    weight, _ = make_weight(515, 1029, torch.bfloat16, "transposed", gen, device="cuda")
    res = make_residual(weight, mode)
    res.copy_(torch.randn(515, 1029, generator=gen) * 1e-3)
    left, right = make_factors(515, 1029, 33, gen, device="cuda", scale=1e-2)
    ref = reference(weight.cpu(), left.cpu(), right.cpu(), 0.7, res.cpu())
    apply_low_rank_(weight, left, right, 0.7, residual=res)
    torch.cuda.synchronize()
    total = weight.double().cpu() + res.double().cpu()
    tol = 1e-6 if mode == "fp32" else 4e-3 * res.double().abs().max().item()
    assert (total - ref).abs().max() <= tol + 1e-5 * ref.abs().max()
    assert ((weight.double().cpu() - ref).abs() <= spacing(ref, weight.dtype)).all()
    # many small updates on the GPU: fp32 residual keeps them, none loses most
    start, w, _, target = many_small_updates_cuda("fp32")
    assert abs(update_survival(start, w, target - start)["fraction"] - 1.0) < 0.02
    assert ((w.double() - target).abs() / spacing(target, w.dtype)).max() <= 1.0
    start, w, _, target = many_small_updates_cuda("none")
    assert update_survival(start, w, target - start)["fraction"] < 0.5


def many_small_updates_cuda(mode, n_updates=500, rel=3e-4):
    gen = torch.Generator().manual_seed(13)
    m, k, rank = 256, 384, 4
    w = (torch.randn(m, k, generator=gen, dtype=torch.float64) * 0.05).to("cuda", torch.bfloat16)
    start = w.double().cpu()
    ref = start.clone()
    res = make_residual(w, mode)
    for _ in range(n_updates):
        left = torch.randn(m, rank, generator=gen, dtype=torch.float64)
        right = torch.randn(rank, k, generator=gen, dtype=torch.float64)
        left *= rel * start.norm() / (left @ right).norm()
        ref += left @ right
        apply_low_rank_(w, left.float().cuda(), right.float().cuda(), 1.0, residual=res)
    return start, w.cpu(), res, ref


@needs_cuda
@needs_triton
def test_cuda_auto_dispatch():
    fp32, bf16 = torch.zeros(8, 8, device="cuda"), torch.zeros(8, 8, device="cuda", dtype=torch.bfloat16)
    assert resolve_path(fp32, "auto") == "triton"
    assert resolve_path(bf16, "auto", torch.zeros_like(fp32)) == "triton"
    assert resolve_path(fp32.double(), "auto") == "torch"


@needs_cuda
def test_cuda_torch_path_matches_fp64():
    gen = torch.Generator().manual_seed(14)
    for dtype in DTYPES:
        weight, _ = make_weight(1031, 2053, dtype, "transposed", gen, device="cuda")
        left, right = make_factors(1031, 2053, 64, gen, device="cuda")
        ref = reference(weight.cpu(), left.cpu(), right.cpu(), 0.37)
        apply_low_rank_(weight, left, right, 0.37, path="torch")
        assert_matches(weight.cpu(), ref, left.cpu(), right.cpu(), 0.37)
