"""The device layer: every catalog kind's device type, plugin and backend; YAML overrides;
discovery; a `mode: real` kind whose plugin is missing stops the run before it starts."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.cluster import CATALOG, cluster_from_dict
from hetrain.cluster.devices import DEVICE_TYPES, real_problem
from hetrain.cluster.discovery import match_kind, real_kind_devices
from hetrain.comm.groups import torch_backend
from hetrain.errors import ClusterError
from tests.conftest import EXAMPLES

# What each vendor's PyTorch plugin registers: (device type, module to import, backend).
VENDOR_NAMES = {
    "nvidia": ("cuda", None, "nccl"),
    "amd": ("cuda", None, "nccl"),  # ROCm torch: device "cuda", RCCL registered as "nccl"
    "huawei": ("npu", "torch_npu", "hccl"),
    "cambricon": ("mlu", "torch_mlu", "cncl"),
    "moorethreads": ("musa", "torch_musa", "mccl"),
    "generic": ("cpu", None, "gloo"),
}
BY_KIND = {
    "Max1550": ("xpu", None, "xccl"),
    "Gaudi2": ("hpu", "habana_frameworks.torch", "hccl"),
    # Biren publishes no plugin: left unset for the cluster YAML to declare.
    "BR104": ("biren", None, None),
}


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_catalog_kind_maps_to_its_vendors_plugin_and_backend(name):
    kind = CATALOG[name]
    want = BY_KIND.get(name) or VENDOR_NAMES[kind.vendor]
    assert (kind.device_type, kind.plugin, kind.backend) == want
    assert kind.source, f"{name}: the catalog must say where its figures come from"


def test_built_in_device_types_agree_with_torchs_backend_registry():
    # torch itself maps the device types it ships to their default backend.
    registry = dist.Backend.default_device_backend_map
    for device_type, runtime in DEVICE_TYPES.items():
        if device_type in registry and runtime.plugin is None:
            assert registry[device_type] == runtime.backend, device_type


def test_yaml_overrides_a_catalog_kinds_runtime_and_declares_a_new_kind():
    c = cluster_from_dict({
        "kinds": {
            "BR104": {"plugin": "torch_br", "device_type": "supa", "backend": "sccl"},
            "910b": {"mode": "real"},
            "MI300X": {"device_type": "npu"},
            "BR106": {"vendor": "biren", "plugin": "torch_br", "device_type": "supa",
                      "backend": "sccl", "flops": {"bf16": 1e14}, "memory_gib": 32,
                      "memory_bandwidth_gbps": 800, "source": "owner's measurement"},
        },
        "nodes": [{"name": "a", "kind": "BR104"}, {"name": "b", "kind": "BR106"}]})
    br104 = c.kinds["BR104"]
    assert (br104.device_type, br104.plugin, br104.backend) == ("supa", "torch_br", "sccl")
    assert br104.flops == CATALOG["BR104"].flops  # only the named fields change
    assert c.kinds["Ascend910B"].mode == "real" and c.kinds["Ascend910B"].plugin == "torch_npu"
    # A new device type brings that type's plugin and backend.
    assert (c.kinds["MI300X"].plugin, c.kinds["MI300X"].backend) == ("torch_npu", "hccl")
    assert c.kinds["BR106"].plugin == "torch_br"
    assert CATALOG["BR104"].plugin is None  # the catalog itself is untouched


def test_bad_mode_is_one_line():
    with pytest.raises(ClusterError, match=r"kinds\[0\]: mode: Input should be 'auto'"):
        cluster_from_dict({"kinds": {"cpu": {"mode": "sometimes"}},
                           "nodes": [{"name": "a", "kind": "cpu"}]})


@pytest.mark.parametrize(("driver", "device_type", "kind"), [
    ("NVIDIA H200", "cuda", "H200"),
    ("NVIDIA H20", "cuda", "H20"),
    ("NVIDIA A100-SXM4-80GB", "cuda", "A100-80GB"),
    ("Ascend910B2", "npu", "Ascend910B"),
    ("Ascend910B2", "cuda", None),  # a kind only matches devices of its own type
    ("MTT S4000", "musa", "MTT-S4000"),
    ("Intel(R) Data Center GPU Max 1550", "xpu", "Max1550"),
    ("NVIDIA H100 80GB HBM3", "cuda", "H100"),
])
def test_driver_names_match_kinds_of_their_device_type(driver, device_type, kind):
    assert match_kind(driver, device_type) == kind


def test_cpu_is_real_and_absent_kinds_emulated():
    c = cluster_from_dict({"nodes": [{"name": "c", "kind": "cpu", "count": 2},
                                     {"name": "n", "kind": "Ascend910B"}]})
    real = real_kind_devices(c.kinds, c.kind_counts())
    assert real == {"cpu": ["cpu", "cpu"]}  # one process per CPU device


@pytest.mark.parametrize(("kinds", "named"), [
    ({"Ascend910B": {"mode": "real"}}, ["Ascend910B", "torch_npu", "'hccl'"]),
    ({"Gaudi2": {"mode": "real"}},
     ["Gaudi2", "habana_frameworks.torch is not installed", "'hpu'", "'hccl'"]),
    ({"acme": {"vendor": "acme", "device_type": "acme", "plugin": "hetrain_no_such_plugin",
               "backend": "accl", "flops": {"bf16": 1e14}, "memory_gib": 8,
               "memory_bandwidth_gbps": 100, "mode": "real"}},
     ["acme", "hetrain_no_such_plugin", "'accl'"]),
])
def test_real_kind_without_its_plugin_fails_in_one_line(kinds, named):
    kind = next(iter(kinds))
    c = cluster_from_dict({"kinds": kinds, "nodes": [{"name": "n", "kind": kind}]})
    with pytest.raises(ClusterError) as err:
        real_kind_devices(c.kinds, c.kind_counts())
    message = str(err.value)
    assert "\n" not in message
    for word in named:
        assert word in message


def test_train_refuses_a_real_kind_without_plugin_before_any_worker(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("kinds:\n  Ascend910B: {mode: real}\n"
                       "nodes:\n  - {name: c, kind: cpu}\n  - {name: n, kind: Ascend910B}\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--cluster", str(cluster), "--steps", "1",
                                      "--out-dir", str(out), "--global-batch", "4"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], result.output
    for word in ("Ascend910B", "torch_npu", "hccl"):
        assert word in lines[0]
    assert not out.exists()  # no worker ever started (they write their reports there)


def test_auto_kind_reports_why_it_is_emulated():
    assert "torch_npu" in real_problem(CATALOG["Ascend910B"], 1, 0)
    assert "declare it" in real_problem(CATALOG["BR104"], 1, 0)
    assert real_problem(CATALOG["cpu"], 4, 1) is None


def test_torch_backend_follows_the_distributed_registry():
    assert torch_backend("gloo", "cpu") == "gloo"
    assert torch_backend("hccl", "cpu") == "gloo"  # emulated kinds run on the CPU
    if not dist.is_backend_available("hetrain_test"):
        dist.Backend.register_backend("hetrain_test", lambda *a: None, devices=["cpu"])
    # A backend some plugin registered is used for its device type, without a vendor branch.
    assert torch_backend("hetrain_test", "npu:0") == "hetrain_test"
    assert torch_backend("hetrain_unregistered", "npu:0") == "gloo"


def test_devices_json_lists_the_cpu_as_a_usable_real_device(tmp_path):
    out = tmp_path / "devices.json"
    result = CliRunner().invoke(app, ["devices", "--json", str(out), "--cluster",
                                      str(EXAMPLES / "clusters" / "cpu-and-emulated.yaml")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    cpu = [d for d in report["devices"] if d["device_type"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["usable"] and cpu[0]["kind"] == "cpu"
    assert cpu[0]["memory_gib"] > 0
    for dev in report["devices"]:
        assert {"kind", "vendor", "memory_gib", "usable"} <= set(dev)
    modes = report["cluster"]["kinds"]
    assert modes["cpu"]["mode"] == "real"
    assert {modes["half-cpu"]["mode"], modes["quarter-cpu"]["mode"]} == {"emulated"}
    types = {t["device_type"]: t for t in report["device_types"]}
    assert types["npu"]["plugin"] == "torch_npu" and types["cpu"]["backend_available"]


def test_driver_name_without_memory_size_picks_the_kind_by_memory():
    assert match_kind("NVIDIA A100-SXM4", "cuda", memory_gib=79.2) == "A100-80GB"
    assert match_kind("NVIDIA A100-SXM4", "cuda", memory_gib=39.4) == "A100-40GB"
