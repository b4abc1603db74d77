"""Backend overheads timed by `paraplan profile` (paraplan.profiler.overheads): the conversion of measured extra
times into per-block and per-fetch overheads (hand arithmetic on the hand profile's links), how the cost model and a
calibration use them, and one real two-process measurement."""

from __future__ import annotations

import pytest
from calibration_helpers import SEQ, TRUE, hand_profile, synthetic_run
from conftest import make_plan

from paraplan.cost_models.calibration import fit_calibration, plan_costs_at, predict_calibrated, transform_inputs
from paraplan.cost_models.costs import predict
from paraplan.errors import ProfileError
from paraplan.models.presets import load_model_spec
from paraplan.profiler.overheads import overheads_from_times, profile_backend_overheads
from paraplan.types import BackendOverheads

SPEC = load_model_spec("llama-tiny")  # hidden 384, 6 layers
# The hand profile's gloo links: bus bandwidth 1 GB/s; latency = the 64 KiB all-reduce's 250 us minus its bytes.
BW, LAT = 1e9, 250e-6 - 65536 / 1e9
ACT = 2 * SEQ * SPEC.hidden * 4  # one micro-batch's hidden states, fp32 bytes: what each tp all-reduce moves


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_tp_overhead_is_the_extra_time_beyond_seven_priced_all_reduces(backend):
    """Both backends shard q, k, v, gate and up apart: 2 all-reduces forward and 5 backward per block
    (backend_profiles.DTENSOR_TP_COLLECTIVES), each ``latency + 2 (n-1)/n x bytes / bus bw`` = LAT + ACT / BW
    for n = 2."""
    priced = 7 * (LAT + ACT / BW)
    blocks = 3
    out = overheads_from_times(hand_profile(), {f"{backend}_tp": blocks * (priced + 0.02)}, 2, blocks)
    assert out[backend].tp_block_s == pytest.approx(0.02, rel=1e-9)
    assert out[backend].zero3_fetch_s is None
    # Less extra time than the priced collectives is no overhead (never negative).
    assert overheads_from_times(hand_profile(), {f"{backend}_tp": 0.0}, 2, blocks)[backend].tp_block_s == 0.0


@pytest.mark.parametrize("backend, units", [("torch", 1), ("deepspeed", 9)])
def test_zero3_overhead_is_per_fetch_unit_forward_and_backward(backend, units):
    """FSDP2 fetches a block as one unit, DeepSpeed per leaf module (q, k, v, o, gate, up, down, two RMSNorms):
    ``delta`` more seconds per fetch costs ``blocks x 2 x units x delta`` more per pass."""
    blocks, delta, base = 4, 0.003, 5.0  # base: extra time well above the priced traffic
    first = overheads_from_times(hand_profile(), {f"{backend}_zero3": base}, 2, blocks)[backend].zero3_fetch_s
    more = overheads_from_times(hand_profile(), {f"{backend}_zero3": base + blocks * 2 * units * delta}, 2,
                                blocks)[backend].zero3_fetch_s
    assert first > 0 and more - first == pytest.approx(delta, rel=1e-9)


def _with_overheads(tp_s: float | None, fetch_s: float | None, backend: str = "torch"):
    over = BackendOverheads(tp_block_s=tp_s, zero3_fetch_s=fetch_s, micro_batch_size=2, blocks=1)
    return hand_profile().model_copy(update={"backend_overheads": {backend: over}})


def test_cost_model_adds_the_measured_overhead_of_its_backend_only():
    """tp = 2 on cpu:2 (no overlap): each of the L blocks takes the overhead once per micro-batch; the other
    backend's cost profile, and one without a profile's measurement, add nothing; a set value replaces it."""
    plan = make_plan(cluster="cpu:2", seq_len=SEQ, global_batch=8, micro_batch_size=2, tp=2)
    m = plan.strategy.grad_accum

    def step(profile, backend):
        return predict(*plan_costs_at(plan, *transform_inputs(plan.cluster, profile, 1, 1, 1, LAT, 1),
                                      backend)).step_time_s

    base = step(hand_profile(), "torch")
    assert step(_with_overheads(0.02, None), "torch") - base == pytest.approx(SPEC.n_layers * m * 0.02, rel=1e-6)
    assert step(_with_overheads(0.02, None), "deepspeed") == pytest.approx(step(hand_profile(), "deepspeed"))
    calibrated = _with_overheads(0.02, None).model_copy(update={"tp_block_overhead_s": 0.005})
    assert step(calibrated, "torch") - base == pytest.approx(SPEC.n_layers * m * 0.005, rel=1e-6)


def test_calibration_without_tp_runs_keeps_the_measured_tp_overhead(tmp_path):
    """Calibrated on dp = 2 and pp = 2 only, a tp = 2 plan is priced with the profile's measured overhead (not
    0), on top of the calibrated compute: the difference to the same profile without it is L x m x overhead."""
    runs = [synthetic_run(tmp_path / "dp", dp=2), synthetic_run(tmp_path / "pp", pp=2)]
    cal = fit_calibration(runs)
    assert "tp" not in cal.mechanisms
    plan = make_plan(cluster="cpu:2", seq_len=SEQ, global_batch=8, micro_batch_size=2, tp=2)
    with_tp, _ = predict_calibrated(cal, plan, _with_overheads(0.02, None))
    without, _ = predict_calibrated(cal, plan, hand_profile())
    assert with_tp - without == pytest.approx(SPEC.n_layers * plan.strategy.grad_accum * 0.02, rel=1e-6)
    assert TRUE["compute_scale_fwd"] != 1  # the runs were generated off the uncalibrated scales


def test_refuses_what_it_cannot_time():
    gpu = hand_profile().model_copy(update={"device_kind": "cuda"})
    with pytest.raises(ProfileError, match="CPU"):
        profile_backend_overheads(gpu)
    with pytest.raises(ProfileError, match="--links"):
        profile_backend_overheads(hand_profile().model_copy(update={"links": []}))


def test_two_process_measurement_runs_every_backend():
    """The real job (torchrun, gloo, 2 ranks) on one block of llama-tiny: all four passes are timed and give
    overheads >= 0 for both backends."""
    from paraplan.profiler import profile_model

    prof = profile_model(SPEC, [1], 16, warmup=0, repeats=1, links=True)
    out = profile_backend_overheads(prof, blocks=1, warmup=0, repeats=1)
    assert set(out) == {"torch", "deepspeed"}
    for over in out.values():
        assert over.tp_block_s is not None and over.tp_block_s >= 0
        assert over.zero3_fetch_s is not None and over.zero3_fetch_s >= 0
        assert over.blocks == 1 and over.micro_batch_size == 1
    assert set(out["torch"].measured_s) == {"torch_tp", "torch_zero3"}
