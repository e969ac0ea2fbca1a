"""DeviceKind and the built-in catalog of accelerator kinds, from vendors' public spec sheets.

FLOP/s are dense (no sparsity) peak figures per dtype; a kind that lacks a dtype has no entry.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

DTYPES = ("fp32", "tf32", "fp16", "bf16")
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}
TFLOPS = 1e12
GIB = 1024**3


class DeviceKind(BaseModel):
    """One kind of accelerator: what the planner and the cost model need to know about it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    backend: str = Field(min_length=1, description="native collective backend inside the kind")
    torch_device: str = Field(default="cpu", description="torch device type when present")
    flops: dict[str, float] = Field(description="dense peak FLOP/s per dtype")
    memory_gib: float = Field(gt=0)
    memory_bandwidth_gbps: float = Field(gt=0, description="GB/s of device memory")
    intra_node_gbps: float = Field(default=64.0, gt=0, description="GB/s between two in a node")
    efficiency: float = Field(
        default=0.45, gt=0, le=1, description="fraction of peak a transformer layer reaches"
    )

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


def _kind(name: str, vendor: str, backend: str, torch_device: str, *, bf16: float | None,
          fp16: float | None, fp32: float, tf32: float | None = None, memory_gib: float,
          bandwidth_gbps: float, intra_node_gbps: float) -> DeviceKind:
    flops = {"fp32": fp32 * TFLOPS}
    for dtype, tflops in (("tf32", tf32), ("fp16", fp16), ("bf16", bf16)):
        if tflops is not None:
            flops[dtype] = tflops * TFLOPS
    return DeviceKind(name=name, vendor=vendor, backend=backend, torch_device=torch_device,
                      flops=flops, memory_gib=memory_gib, memory_bandwidth_gbps=bandwidth_gbps,
                      intra_node_gbps=intra_node_gbps)


# fmt: off
CATALOG: dict[str, DeviceKind] = {k.name: k for k in (
    _kind("H100", "nvidia", "nccl", "cuda", bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9,
          memory_gib=80, bandwidth_gbps=3350, intra_node_gbps=450),
    _kind("H800", "nvidia", "nccl", "cuda", bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9,
          memory_gib=80, bandwidth_gbps=3350, intra_node_gbps=200),
    _kind("H20", "nvidia", "nccl", "cuda", bf16=148, fp16=148, tf32=74, fp32=44,
          memory_gib=96, bandwidth_gbps=4000, intra_node_gbps=450),
    _kind("A100-40GB", "nvidia", "nccl", "cuda", bf16=312, fp16=312, tf32=156, fp32=19.5,
          memory_gib=40, bandwidth_gbps=1555, intra_node_gbps=300),
    _kind("A100-80GB", "nvidia", "nccl", "cuda", bf16=312, fp16=312, tf32=156, fp32=19.5,
          memory_gib=80, bandwidth_gbps=2039, intra_node_gbps=300),
    _kind("V100", "nvidia", "nccl", "cuda", bf16=None, fp16=125, fp32=15.7,
          memory_gib=32, bandwidth_gbps=900, intra_node_gbps=150),
    _kind("L40S", "nvidia", "nccl", "cuda", bf16=362, fp16=362, tf32=183, fp32=91.6,
          memory_gib=48, bandwidth_gbps=864, intra_node_gbps=32),
    _kind("RTX4090", "nvidia", "nccl", "cuda", bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6,
          memory_gib=24, bandwidth_gbps=1008, intra_node_gbps=32),
    _kind("MI250X", "amd", "rccl", "cuda", bf16=383, fp16=383, fp32=95.7,
          memory_gib=128, bandwidth_gbps=3277, intra_node_gbps=200),
    _kind("MI300X", "amd", "rccl", "cuda", bf16=1307.4, fp16=1307.4, tf32=653.7, fp32=163.4,
          memory_gib=192, bandwidth_gbps=5300, intra_node_gbps=448),
    _kind("Ascend910B", "huawei", "hccl", "npu", bf16=313, fp16=313, fp32=78,
          memory_gib=64, bandwidth_gbps=1600, intra_node_gbps=196),
    _kind("BR104", "biren", "bccl", "biren", bf16=512, fp16=512, tf32=256, fp32=128,
          memory_gib=32, bandwidth_gbps=819, intra_node_gbps=64),
    _kind("MLU370", "cambricon", "cncl", "mlu", bf16=96, fp16=96, fp32=24,
          memory_gib=48, bandwidth_gbps=614, intra_node_gbps=100),
    _kind("Gaudi2", "intel", "hccl", "hpu", bf16=432, fp16=432, tf32=216, fp32=108,
          memory_gib=96, bandwidth_gbps=2450, intra_node_gbps=300),
    _kind("cpu", "generic", "gloo", "cpu", bf16=None, fp16=None, fp32=2,
          memory_gib=64, bandwidth_gbps=100, intra_node_gbps=20),
)}
# fmt: on

ALIASES = {
    "h100-sxm": "H100", "a100": "A100-80GB", "a100-80g": "A100-80GB", "a100-40g": "A100-40GB",
    "910b": "Ascend910B", "ascend-910b": "Ascend910B", "mlu370-x8": "MLU370", "4090": "RTX4090",
    "rtx-4090": "RTX4090", "br-104": "BR104",
}
