"""The int8 kernel check: every int8 Conv / Linear's output codes against integer arithmetic, under every engine;
wrong codes (a kernel that saturates, a corrupted output) are caught, rounding ties are not counted as errors; and an
AVX2-only CPU is emulated on any x86 host by holding FBGEMM and oneDNN below VNNI."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_compress.export import export_int8
from lightning_compress.export.engines import exact_engines, kernels_capped_below_vnni
from lightning_compress.export.kernel_check import CHECKED_LAYERS, check_kernel, kernel_exactness
from lightning_compress.export.verify import Int8MismatchError
from lightning_compress.quantization import quantize_model
from lightning_compress.testing import Conv1dNet, noisy_sines

AVX2_ONLY = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def saturating_net() -> nn.Module:
    """Full-range 8-bit inputs into a convolution with same-sign weights: pairs of products reach 2 x 255 x 127,
    past the 16-bit sums of a kernel without VNNI."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(),
                        nn.Linear(8 * 64, 10)).eval()
    with torch.no_grad():
        net[2].weight.abs_()
    return net


def _int8_layers(int8: nn.Module) -> int:
    return sum(type(m) in CHECKED_LAYERS for m in int8.modules())


@pytest.mark.parametrize("engine", list(torch.backends.quantized.supported_engines))
def test_every_exact_engine_computes_every_layer_like_integer_arithmetic(engine):
    """Full-range and 7-bit activations (the latter exact under every engine on every CPU but onednn without VNNI)."""
    signals, _ = noisy_sines(256, 0)
    checked = 0
    for model, data in ((saturating_net(), torch.rand(64, 4, 8, 8)), (Conv1dNet().eval(), signals)):
        for reduce_range in (False, True):
            fake = quantize_model(model, "static", [data], calibration="max", reduce_range=reduce_range)
            code = export_int8(fake, data, min_agreement=None).verification["max_activation_code"]
            if engine not in exact_engines(code):  # refused here: test_export_engines checks the refusal
                continue
            int8 = export_int8(fake, data, engine=engine, min_agreement=0.99)
            kernel = int8.verification["kernel"]
            assert kernel["layers"] == _int8_layers(int8) >= 2 and kernel["codes"] > 1000, kernel
            assert kernel["wrong"] == 0 and kernel["near_tie"] <= 1e-3 * kernel["codes"], (engine, kernel)
            checked += 1
    assert checked >= (2 if engine in exact_engines(127) else 0), (engine, checked)


def test_a_kernel_whose_codes_are_off_is_caught():
    net = saturating_net()  # seeds the generator
    data = torch.rand(64, 4, 8, 8)
    int8 = export_int8(quantize_model(net, "static", [data], calibration="max"), data)
    layer = next(m for m in int8.modules() if type(m) in CHECKED_LAYERS)

    def shifted(_module, _inputs, output):  # what a wrong kernel would return: some codes 2 steps higher
        codes = output.int_repr().contiguous()
        flat = codes.view(-1)
        flat[::97] = (flat[::97].int() + 2).clamp(max=255).to(codes.dtype)
        return torch._make_per_tensor_quantized_tensor(codes, output.q_scale(), output.q_zero_point())

    handle = layer.register_forward_hook(shifted)
    with torch.no_grad():
        result = kernel_exactness(int8.model, (data,))
    handle.remove()
    assert result["wrong"] > 0 and result["max_code_difference"] == 2 and result["worst"] is not None, result
    with pytest.raises(Int8MismatchError, match="integer arithmetic"):
        check_kernel(result, int8.engine)
    assert kernel_exactness(int8.model, (data,))["wrong"] == 0  # the same layer, unshifted


def test_the_environment_can_hold_the_kernels_below_vnni(monkeypatch):
    for name in ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    assert not kernels_capped_below_vnni()
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX512_E1")  # VNNI allowed
    assert not kernels_capped_below_vnni()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    assert kernels_capped_below_vnni()


EMULATED = textwrap.dedent("""
    import sys, torch, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, {tests!r})
    from test_kernel_check import saturating_net
    import lightning_compress.export.engines as engines
    from lightning_compress.export import export_int8
    from lightning_compress.export.verify import Int8MismatchError
    from lightning_compress.quantization import quantize_model

    assert not engines.has_vnni()
    net = saturating_net()  # seeds the generator
    data = torch.rand(64, 4, 8, 8)
    fake = quantize_model(net, "static", [data], calibration="max")
    auto = export_int8(fake, data, min_agreement=0.99)
    assert auto.engine == "qnnpack" and auto.verification["kernel"]["wrong"] == 0, auto.verification
    engines.has_vnni = lambda: True  # as if the rule let x86 compute full-range codes here
    forced = export_int8(fake, data, engine="x86", min_agreement=None).verification
    assert forced["max_activation_code"] > 127 and forced["kernel"]["wrong"] > 100, forced["kernel"]
    try:
        export_int8(fake, data, engine="x86", min_agreement=0.0)
    except Int8MismatchError as error:
        assert "integer arithmetic" in str(error)
    else:
        raise AssertionError("saturated codes were not refused")
    print("wrong codes under the saturating kernels:", forced["kernel"]["wrong"], "agreement:", forced["agreement"])
""")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="FBGEMM and oneDNN run on x86 only")
def test_an_avx2_only_cpu_emulated_saturates_and_is_caught():
    """In a process with FBGEMM and oneDNN held to AVX2: ``auto`` avoids the saturating kernels, and the kernel
    check catches them when forced (the end-to-end agreement alone measured 0.91 there)."""
    env = {**os.environ, **AVX2_ONLY}
    script = EMULATED.format(tests=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wrong codes under the saturating kernels" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="FBGEMM and oneDNN run on x86 only")
def test_the_engine_tests_pass_on_an_emulated_avx2_only_cpu():
    """The int8 engine, bias and kernel tests again, in a process whose FBGEMM and oneDNN are held to AVX2: what an
    AVX2-only CI host runs, checked on every x86 host."""
    tests = os.path.dirname(__file__)
    files = [os.path.join(tests, name) for name in (
        "test_export_engines.py", "test_bias_rounding.py",
        "test_kernel_check.py::test_every_exact_engine_computes_every_layer_like_integer_arithmetic")]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *files],
                          env={**os.environ, **AVX2_ONLY}, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


def test_a_check_tensor_runs_in_chunks_with_the_numbers_of_one_pass():
    """Some int8 kernels take workspace per sample (qnnpack's ConvNeXt-T: about 1.1 GB per 64 images), so a large
    ``check_inputs`` tensor is run 64 samples at a time; the agreement and errors are those of one pass."""
    from lightning_compress.export.verify import CHECK_CHUNK, check_agreement, output_agreement

    torch.manual_seed(0)
    reference, exported = nn.Linear(6, 4).eval(), nn.Linear(6, 4).eval()
    seen: list[int] = []
    exported.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    x, inputs = torch.randn(8, 6), torch.randn(150, 6)
    result = check_agreement(reference, exported, (x,), inputs)
    assert seen == [8, CHECK_CHUNK, CHECK_CHUNK, 150 - 2 * CHECK_CHUNK], seen
    with torch.no_grad():
        whole = output_agreement(reference(torch.cat([x, inputs])), exported(torch.cat([x, inputs])))
    assert result["samples"] == 158 and result["agreement"] == whole["agreement"]
    assert result["relative_error"] == pytest.approx(whole["relative_error"], rel=1e-6)
