"""DeviceKind and the built-in catalog of accelerator kinds, from vendors' public spec sheets.

FLOP/s are dense (no sparsity) peak figures per dtype; a kind that lacks a dtype has no entry.
Each kind also names how PyTorch reaches it (device type, plugin module, collective backend;
see cluster/devices.py) and where its figures come from (`source`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from hetrain.cluster.devices import DEVICE_TYPES

DTYPES = ("fp32", "tf32", "fp16", "bf16")
# fp64: no kind is planned in it, but exactness runs compute in it (memory estimates)
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
TFLOPS = 1e12
GIB = 1024**3


class DeviceKind(BaseModel):
    """One kind of accelerator: what the planner and the cost model need to know about it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    device_type: str = Field(
        default="cpu", min_length=1, validation_alias=AliasChoices("device_type", "torch_device"),
        description="torch device type of the kind's devices (cuda, npu, mlu, musa, xpu, hpu)")
    plugin: str | None = Field(
        default=None, description="module to import before the device type exists (torch_npu); "
        "None: built into torch, or not public (then declare it in the cluster YAML)")
    backend: str | None = Field(
        default=None, min_length=1, description="torch.distributed backend inside the kind "
        "(nccl, hccl, cncl, mccl, xccl, gloo); None: not public, declare it to run real")
    mode: Literal["auto", "real", "emulated"] = Field(
        default="auto", description="auto: real when its plugin and enough devices are here, "
        "else emulated; real: must run real (the run fails before start otherwise); emulated")
    source: str = Field(default="", description="where the figures come from")
    flops: dict[str, float] = Field(description="dense peak FLOP/s per dtype")
    memory_gib: float = Field(gt=0)
    memory_bandwidth_gbps: float = Field(gt=0, description="GB/s of device memory")
    intra_node_gbps: float = Field(default=64.0, gt=0, description="GB/s between two in a node")
    efficiency: float = Field(
        default=0.45, gt=0, le=1, description="fraction of peak a transformer layer reaches"
    )

    @model_validator(mode="before")
    @classmethod
    def _runtime_defaults(cls, data: Any) -> Any:
        # A kind that names a known device type gets that type's plugin and backend unless it
        # says otherwise (`plugin: null` is saying otherwise).
        if isinstance(data, dict):
            device_type = data.get("device_type", data.get("torch_device"))
            known = DEVICE_TYPES.get(device_type) if isinstance(device_type, str) else None
            if known is not None:
                data = {"plugin": known.plugin, "backend": known.backend, **data}
        return data

    @field_validator("flops")
    @classmethod
    def _known_dtypes(cls, flops: dict[str, float]) -> dict[str, float]:
        if not flops:
            raise ValueError("needs at least one dtype, e.g. {bf16: 312e12}")
        for dtype, value in flops.items():
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
            if value <= 0:
                raise ValueError(f"{dtype} FLOP/s must be > 0 (got {value})")
        return flops

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    def supports(self, dtype: str) -> bool:
        return dtype in self.flops

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`; fp32 training falls back on tf32 tensor cores if listed."""
        if dtype == "fp32" and "tf32" in self.flops:
            return self.flops["tf32"]
        if dtype not in self.flops:
            raise KeyError(f"kind {self.name} does not compute in {dtype}")
        return self.flops[dtype]

    def best_dtype(self) -> str:
        """The 16-bit dtype the kind trains in by default (bf16, else fp16, else fp32)."""
        for dtype in ("bf16", "fp16", "fp32"):
            if dtype in self.flops:
                return dtype
        return next(iter(self.flops))


def _kind(name: str, vendor: str, device_type: str, *, bf16: float | None, fp16: float | None,
          fp32: float, tf32: float | None = None, memory_gib: float, bandwidth_gbps: float,
          intra_node_gbps: float, source: str) -> DeviceKind:
    flops = {"fp32": fp32 * TFLOPS}
    for dtype, tflops in (("tf32", tf32), ("fp16", fp16), ("bf16", bf16)):
        if tflops is not None:
            flops[dtype] = tflops * TFLOPS
    # Plugin and backend follow from the device type (cluster/devices.py DEVICE_TYPES).
    return DeviceKind(name=name, vendor=vendor, device_type=device_type, flops=flops,
                      memory_gib=memory_gib, memory_bandwidth_gbps=bandwidth_gbps,
                      intra_node_gbps=intra_node_gbps, source=source)


# Biren publishes neither its PyTorch plugin's module name nor the device type and backend it
# registers: "biren" is a placeholder, and a cluster YAML declares the real names
# (kinds: BR104: {plugin: ..., device_type: ..., backend: ...}) to run the kind for real.
# BR106 is not in the catalog: no public spec sheet gives its figures; declare it likewise.
# fmt: off
CATALOG: dict[str, DeviceKind] = {k.name: k for k in (
    _kind("H100", "nvidia", "cuda", bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9,
          memory_gib=80, bandwidth_gbps=3350, intra_node_gbps=450,
          source="NVIDIA H100 Tensor Core GPU datasheet, SXM5 (dense = sparse / 2)"),
    _kind("H200", "nvidia", "cuda", bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9,
          memory_gib=141, bandwidth_gbps=4800, intra_node_gbps=450,
          source="NVIDIA H200 Tensor Core GPU datasheet, SXM (dense = sparse / 2; "
                 "NVLink 900 GB/s both directions)"),
    _kind("H800", "nvidia", "cuda", bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9,
          memory_gib=80, bandwidth_gbps=3350, intra_node_gbps=200,
          source="NVIDIA H800 SXM5 product brief (H100 compute, NVLink 400 GB/s)"),
    _kind("H20", "nvidia", "cuda", bf16=148, fp16=148, tf32=74, fp32=44,
          memory_gib=96, bandwidth_gbps=4000, intra_node_gbps=450,
          source="NVIDIA HGX H20 figures as reported (not re-checked against a sheet)"),
    _kind("A100-40GB", "nvidia", "cuda", bf16=312, fp16=312, tf32=156, fp32=19.5,
          memory_gib=40, bandwidth_gbps=1555, intra_node_gbps=300,
          source="NVIDIA A100 Tensor Core GPU datasheet, SXM4 40GB"),
    _kind("A100-80GB", "nvidia", "cuda", bf16=312, fp16=312, tf32=156, fp32=19.5,
          memory_gib=80, bandwidth_gbps=2039, intra_node_gbps=300,
          source="NVIDIA A100 Tensor Core GPU datasheet, SXM4 80GB"),
    _kind("V100", "nvidia", "cuda", bf16=None, fp16=125, fp32=15.7,
          memory_gib=32, bandwidth_gbps=900, intra_node_gbps=150,
          source="NVIDIA V100 Tensor Core GPU datasheet, SXM2 32GB (no bf16)"),
    _kind("L40S", "nvidia", "cuda", bf16=362, fp16=362, tf32=183, fp32=91.6,
          memory_gib=48, bandwidth_gbps=864, intra_node_gbps=32,
          source="NVIDIA L40S datasheet (dense; PCIe Gen4 x16 between cards)"),
    _kind("RTX4090", "nvidia", "cuda", bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6,
          memory_gib=24, bandwidth_gbps=1008, intra_node_gbps=32,
          source="NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090 (fp32 acc.)"),
    # ROCm builds of torch run AMD GPUs as device type "cuda"; RCCL is their "nccl" backend.
    _kind("MI250X", "amd", "cuda", bf16=383, fp16=383, fp32=95.7,
          memory_gib=128, bandwidth_gbps=3277, intra_node_gbps=200,
          source="AMD Instinct MI250X datasheet"),
    _kind("MI300X", "amd", "cuda", bf16=1307.4, fp16=1307.4, tf32=653.7, fp32=163.4,
          memory_gib=192, bandwidth_gbps=5300, intra_node_gbps=448,
          source="AMD Instinct MI300X datasheet (dense)"),
    _kind("Ascend910B", "huawei", "npu", bf16=313, fp16=313, fp32=78,
          memory_gib=64, bandwidth_gbps=1600, intra_node_gbps=196,
          source="Ascend 910B figures as reported (not re-checked against a Huawei sheet)"),
    _kind("BR104", "biren", "biren", bf16=512, fp16=512, tf32=256, fp32=128,
          memory_gib=32, bandwidth_gbps=819, intra_node_gbps=64,
          source="Biren launch figures, 2022-08 (BR104: 128 FP32, 256 TF32+, 512 BF16 "
                 "TFLOPS, 32 GB HBM2e at 819 GB/s); fp16 = bf16 assumed"),
    _kind("MLU370", "cambricon", "mlu", bf16=96, fp16=96, fp32=24,
          memory_gib=48, bandwidth_gbps=614, intra_node_gbps=100,
          source="Cambricon MLU370-X8 figures as reported (not re-checked here)"),
    _kind("MTT-S4000", "moorethreads", "musa", bf16=100, fp16=100, tf32=50, fp32=25,
          memory_gib=48, bandwidth_gbps=768, intra_node_gbps=240,
          source="Moore Threads MTT S4000 launch figures, 2023-12 (48 GB GDDR6 at 768 GB/s, "
                 "MTLink 1.0 240 GB/s)"),
    _kind("Max1550", "intel", "xpu", bf16=838.9, fp16=838.9, tf32=419.4, fp32=52.4,
          memory_gib=128, bandwidth_gbps=3277, intra_node_gbps=64,
          source="Intel Data Center GPU Max 1550 product brief (128 Xe cores at 1.6 GHz, "
                 "128 GB HBM2e at 3.2768 TB/s); between cards PCIe 5.0 x16, Xe Link unused"),
    _kind("Gaudi2", "intel", "hpu", bf16=432, fp16=432, tf32=216, fp32=108,
          memory_gib=96, bandwidth_gbps=2450, intra_node_gbps=300,
          source="Intel Gaudi 2 figures as reported (not re-checked here)"),
    _kind("cpu", "generic", "cpu", bf16=None, fp16=None, fp32=2,
          memory_gib=64, bandwidth_gbps=100, intra_node_gbps=20,
          source="nominal many-core server CPU (no spec sheet): the host as a real kind"),
)}
# fmt: on

ALIASES = {
    "h100-sxm": "H100", "a100": "A100-80GB", "a100-80g": "A100-80GB", "a100-40g": "A100-40GB",
    "910b": "Ascend910B", "ascend-910b": "Ascend910B", "mlu370-x8": "MLU370", "4090": "RTX4090",
    "rtx-4090": "RTX4090", "br-104": "BR104", "h200-sxm": "H200", "s4000": "MTT-S4000",
    "mtt-s4000": "MTT-S4000", "max-1550": "Max1550", "pvc": "Max1550",
}
