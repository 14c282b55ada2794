"""Counting compute: the FLOPs per token a model costs in training (6N + attention) and in a
forward pass (2N + attention), N being every weight a token is multiplied by (the LM head
included, tied or not; embedding lookups not), as in the PaLM / Chinchilla accounting; and the
peak FLOP/s that MFU divides by."""

from __future__ import annotations

import time

import torch

# dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name;
# the first match wins, so specific names come before their family's
DEVICE_PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]


def matmul_params(model) -> int:
    """Weights every token is multiplied by: all parameters except embedding lookups (token and
    position tables); the LM head counts even when tied to the input embedding."""
    lookups = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in lookups:  # tied: a lookup and a matmul
        total += head.weight.numel()
    return total


def attention_width(config) -> tuple[int, int]:
    """(layers, query width) of the attention score/value matmuls; (0, 0) without attention."""
    config = config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    if not heads:  # state-space models (Mamba)
        return 0, 0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def flops_per_token(model, seq_len: int, *, training: bool) -> int:
    """Training (forward + backward) or forward-only model FLOPs per token."""
    layers, width = attention_width(model.config)
    n = matmul_params(model)
    return (6 * n + 12 * layers * width * seq_len) if training else (2 * n + 4 * layers * width * seq_len)


def flops_formula(model, seq_len: int, *, training: bool) -> str:
    layers, width = attention_width(model.config)
    n = matmul_params(model)
    k, a = (6, 12) if training else (2, 4)
    return (f"{k} x {n:,} matmul params + {a} x {layers} layers x {width} attention width x "
            f"{seq_len} seq = {flops_per_token(model, seq_len, training=training):,} per token")


def table_peak(device) -> tuple[float, str] | None:
    """The device's theoretical dense bf16 peak FLOP/s from DEVICE_PEAKS, with its source."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in DEVICE_PEAKS:
        if key in name:
            return peak, f"table: {name} dense bf16 peak"
    return None


def measure_peak_flops(device) -> float:
    """Achievable dense matmul FLOP/s on this worker (fp32 on CPU, bf16 on GPU): MFU's denominator."""
    import torch

    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)
