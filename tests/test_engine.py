"""Tests of the denoiser-engine cost model (jaxnoise.engine): hand counts, cycles, buffers, totals, validation."""

import dataclasses
import math

import pytest

from jaxnoise import engine
from jaxnoise.engine import AnalogLayer, BlockShape, EngineConfig

RESIDUAL = BlockShape(site="layer1/0", height=32, width=32, channels=16, bottleneck=4)
PROBABILISTIC = BlockShape(site="layer2/0", height=8, width=8, channels=16, bottleneck=4, kind="probabilistic")
DENSE = BlockShape(site="pre_logits", height=1, width=1, channels=64, bottleneck=16, spatial=False)
LAYERS = [AnalogLayer("stem", rows=27, cols=16, mvms_per_image=1024),
          AnalogLayer("layer1/0/conv1", rows=144, cols=16, mvms_per_image=1024),
          AnalogLayer("head", rows=300, cols=300, mvms_per_image=1)]


def test_residual_block_hand_count():
    cost = engine.block_cost(RESIDUAL)
    assert cost["params"] == 16 * 4 + 4 + 9 * 4 * 4 + 4 + 4 * 16 + 16 == 296
    assert cost["macs"] == 32 * 32 * (16 * 4 + 9 * 4 * 4 + 4 * 16) == 278528
    assert [layer["macs"] for layer in cost["layers"]] == [65536, 147456, 65536]
    assert cost["elementwise_ops"] == 32 * 32 * 16  # residual add only
    assert cost["frame_buffer_bytes"] == 0
    assert cost["site"] == "layer1/0" and cost["kind"] == "residual"


def test_probabilistic_block_hand_count():
    cost = engine.block_cost(PROBABILISTIC)
    assert cost["params"] == 296 + 2 * (4 * 16 + 16) == 456
    assert cost["macs"] == 8 * 8 * (64 + 144 + 64) + 2 * 4 * 16 == 17536  # heads act once on the pooled bottleneck
    n = 8 * 8 * 16
    # residual add, pooling sums, variance (2/element), per-channel (exp + finalisation), gain (3/element)
    assert cost["elementwise_ops"] == n + 8 * 8 * 4 + 2 * n + 4 * 16 + 3 * n == 6464
    assert cost["frame_buffer_bytes"] == 8 * 8 * 4  # bottleneck map kept until the statistics are known
    assert cost["activation_buffer_bytes"] == cost["line_buffer_bytes"] + cost["frame_buffer_bytes"]


def test_dense_blocks_hand_count():
    cost = engine.block_cost(DENSE)
    assert cost["params"] == 64 * 16 + 16 + 16 * 16 + 16 + 16 * 64 + 64 == 2400
    assert cost["macs"] == 64 * 16 + 16 * 16 + 16 * 64 == 2304
    assert cost["elementwise_ops"] == 64
    assert cost["line_buffer_bytes"] == 16 + 64
    prob = engine.block_cost(dataclasses.replace(DENSE, kind="probabilistic"))
    assert prob["params"] == 2400 + 2 * (16 * 64 + 64) == 4576
    assert prob["macs"] == 2304 + 2 * 16 * 64 == 4352
    assert prob["elementwise_ops"] == 64 + 64 + 64 + 3 * 64  # residual add, h^2, exp per channel, gain
    assert prob["frame_buffer_bytes"] == 0


def test_cycles_default_config():
    cost = engine.block_cost(RESIDUAL)
    # 8 cores x 9 MACs = 72 per cycle: ceil(65536/72) = 911, 147456/72 = 2048 exactly
    assert [layer["cycles"] for layer in cost["layers"]] == [911, 2048, 911]
    assert cost["elementwise_cycles"] == 16384 // 16
    assert cost["cycles"] == 911 + 2048 + 911 + 1024 + 64 == 4958
    assert cost["latency_s"] == pytest.approx(4958 / 500e6)


def test_cycles_hand_example():
    config = EngineConfig(num_cores=2, macs_per_core_per_cycle=9, pointwise_efficiency=0.5, clock_hz=1e6,
                          elementwise_ops_per_cycle=4, block_overhead_cycles=10, gaussian_cycles_per_sample=0.5)
    block = BlockShape(site="s", height=4, width=4, channels=8, bottleneck=2)
    cost = engine.block_cost(block, config, gaussian_samples_per_image=7)
    # 1x1 layers: 256 MACs at 2*9*0.5 = 9/cycle -> 29; 3x3: 576 MACs at 18/cycle -> 32
    assert [layer["cycles"] for layer in cost["layers"]] == [29, 32, 29]
    assert cost["elementwise_cycles"] == 128 // 4
    assert cost["gaussian_cycles"] == math.ceil(7 * 0.5) == 4
    assert cost["overhead_cycles"] == 10
    assert cost["cycles"] == 29 + 32 + 29 + 32 + 4 + 10 == 136
    assert cost["latency_s"] == pytest.approx(136e-6)
    assert engine.block_cost(block, config)["gaussian_cycles"] == 0  # default: no sampling


def test_buffer_bytes():
    cost = engine.block_cost(RESIDUAL)
    assert cost["weight_buffer_bytes"] == 296
    assert cost["line_buffer_bytes"] == 3 * 32 * 4 + 2 * 32 * 16 == 1408
    half = engine.block_cost(RESIDUAL, EngineConfig(weight_bits=4, activation_bits=4))
    assert half["weight_buffer_bytes"] == 148 and half["line_buffer_bytes"] == 704
    odd = engine.block_cost(BlockShape(site="fc", height=1, width=1, channels=10, bottleneck=5, spatial=False),
                            EngineConfig(weight_bits=4, activation_bits=3))
    assert odd["params"] == 145
    assert odd["weight_buffer_bytes"] == math.ceil(145 * 4 / 8) == 73  # rounded up
    assert odd["line_buffer_bytes"] == math.ceil(15 * 3 / 8) == 6


def test_backbone_cost():
    cost = engine.backbone_cost(LAYERS)
    assert cost["layers"] == 3
    assert cost["params"] == 27 * 16 + 144 * 16 + 300 * 300
    assert cost["macs"] == 27 * 16 * 1024 + 144 * 16 * 1024 + 300 * 300
    assert cost["tiles"] == 1 + 1 + 4  # 300 x 300 needs 2 x 2 tiles of 256 x 256
    assert cost["analog_mvms"] == 2049
    assert cost["latency_s"] == pytest.approx(2049 * 100e-9)


def test_placement_totals_and_overheads():
    blocks = [RESIDUAL, PROBABILISTIC, DENSE]
    cost = engine.placement_cost(blocks, LAYERS, gaussian_samples_per_image=3)
    per_block = [engine.block_cost(b, gaussian_samples_per_image=3) for b in blocks]
    assert cost["blocks"] == per_block
    for key in ("params", "macs", "elementwise_ops", "cycles", "weight_buffer_bytes"):
        assert cost["totals"][key] == sum(b[key] for b in per_block)
    assert cost["totals"]["latency_s"] == pytest.approx(sum(b["latency_s"] for b in per_block))
    for key in ("line_buffer_bytes", "frame_buffer_bytes", "activation_buffer_bytes"):
        assert cost["totals"][key] == max(b[key] for b in per_block)
    assert cost["totals"]["line_buffer_bytes"] == 1408
    backbone = engine.backbone_cost(LAYERS)
    assert cost["backbone"] == backbone
    assert cost["mac_overhead"] == pytest.approx(cost["totals"]["macs"] / backbone["macs"])
    assert cost["latency_overhead"] == pytest.approx(cost["totals"]["latency_s"] / backbone["latency_s"])
    assert cost["param_overhead"] == pytest.approx(cost["totals"]["params"] / backbone["params"])
    assert cost["gaussian_samples_per_image"] == 3 and cost["config"] == EngineConfig().to_dict()


def test_placement_overrides_and_empty():
    cost = engine.placement_cost([RESIDUAL], LAYERS[1:2], backbone_params=2960)
    assert cost["param_overhead"] == pytest.approx(0.1)
    assert cost["mac_overhead"] == pytest.approx(278528 / (144 * 16 * 1024))
    empty = engine.placement_cost([], LAYERS)
    assert empty["totals"]["params"] == 0 and empty["totals"]["line_buffer_bytes"] == 0
    assert empty["mac_overhead"] == 0 and empty["latency_overhead"] == 0


def test_markdown():
    text = engine.markdown(engine.placement_cost([RESIDUAL, PROBABILISTIC, DENSE], LAYERS))
    for site in ("layer1/0", "layer2/0", "pre_logits"):
        assert f"| {site} |" in text
    assert "32 x 32" in text and "dense" in text and "**total**" in text
    assert "Overhead: MACs" in text and "Backbone (analog)" in text
    assert text.endswith("\n")
    with pytest.raises(ValueError, match="placement_cost"):
        engine.markdown(engine.block_cost(RESIDUAL))


@pytest.mark.parametrize("field, value", [
    ("num_cores", 0), ("num_cores", -2), ("num_cores", 1.5), ("clock_hz", 0.0), ("clock_hz", -1e6),
    ("clock_hz", float("inf")), ("weight_bits", 0), ("activation_bits", -8), ("pointwise_efficiency", 0.0),
    ("pointwise_efficiency", 1.5), ("pointwise_efficiency", float("nan")), ("macs_per_core_per_cycle", 0),
    ("elementwise_ops_per_cycle", 0), ("block_overhead_cycles", -1), ("gaussian_cycles_per_sample", -0.5),
    ("tile_rows", 0), ("analog_mvm_latency_s", 0.0),
])
def test_engine_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("height", 0), ("width", -1), ("channels", -16), ("bottleneck", 0), ("channels", 16.0), ("kind", "gaussian"),
    ("spatial", "yes"),
])
def test_block_shape_validation(field, value):
    kwargs = dict(site="s", height=8, width=8, channels=16, bottleneck=4)
    with pytest.raises(ValueError, match=field):
        BlockShape(**{**kwargs, field: value})


def test_other_validation():
    with pytest.raises(ValueError, match="height=1 and width=1"):
        BlockShape(site="fc", height=4, width=4, channels=16, bottleneck=4, spatial=False)
    for field in ("rows", "cols", "mvms_per_image"):
        with pytest.raises(ValueError, match=field):
            AnalogLayer(**{**dict(name="l", rows=9, cols=4, mvms_per_image=16), field: 0})
    with pytest.raises(ValueError, match="gaussian_samples_per_image"):
        engine.block_cost(RESIDUAL, gaussian_samples_per_image=-1)
    with pytest.raises(ValueError, match="layers is empty"):
        engine.placement_cost([RESIDUAL], [])
    with pytest.raises(ValueError, match="backbone_params"):
        engine.placement_cost([RESIDUAL], LAYERS, backbone_params=0)
    with pytest.raises(ValueError, match="BlockShape"):
        engine.block_cost("layer1/0")
