"""The benchmark's datasheet peaks: a device's own entry is found, not its family's."""
from programs.bench.gpu.benchmark import DATASHEET_BF16_PEAK, datasheet_peak


def test_every_datasheet_entry_is_found_by_its_own_device_name():
    # the first fragment found wins: a family ("H100") listed before its variant ("H100 PCIe") would hide it
    for fragment, flops in DATASHEET_BF16_PEAK:
        assert datasheet_peak(f"NVIDIA {fragment} 80GB HBM3") == flops, fragment
    assert datasheet_peak("Some Future GPU") is None
