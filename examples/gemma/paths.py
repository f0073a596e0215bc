"""Which path each attention call of a generation takes (FA4 kernel or fallback), from
jax_fa4.explain_call per call signature and from the lowered programs themselves."""
from __future__ import annotations

import jax
import jax.numpy as jnp

import jax_fa4

from .cache import allocate_pages
from .config import GemmaConfig

KERNEL_TARGET = "@jax_fa4_cute_call"  # the FFI custom call of the FA4 kernels


def attention_calls(cfg: GemmaConfig, *, batch: int, total_prefill: int, max_prompt: int,
                    num_pages: int, page_size: int, max_pages: int, prefill: str = "varlen"):
    """The jax_fa4 attention calls one generation makes, per (phase, layer kind):
    {(phase, kind): (fn name, kwargs with ShapeDtypeStructs)} (attention.fa4_attention's
    calls), for explain_call and for `python -m jax_fa4.precompile --calls`."""
    sds = jax.ShapeDtypeStruct
    i32 = jnp.int32
    out = {}
    for kind in ("local", "global"):
        h, kh, n = cfg.head_dim(kind), cfg.kv_heads(kind), cfg.num_heads
        pool = sds((num_pages, page_size, kh, h), cfg.dtype)
        common = dict(scale=cfg.attn_scale, is_causal=True,
                      local_window_size=cfg.attention_window(kind))
        paged = dict(k_cache=pool, v_cache=pool, page_table=sds((batch, max_pages), i32),
                     seqused_k=sds((batch,), i32))
        if prefill == "varlen":
            kv = sds((total_prefill, kh, h), cfg.dtype)
            out[("prefill", kind)] = ("varlen_attention", dict(
                q=sds((total_prefill, n, h), cfg.dtype), k=kv, v=kv,
                cu_seqlens_q=sds((batch + 1,), i32), cu_seqlens_k=sds((batch + 1,), i32),
                max_seqlen_q=max_prompt, max_seqlen_k=max_prompt, **common))
        else:
            out[("prefill", kind)] = ("paged_attention", dict(
                q=sds((total_prefill, n, h), cfg.dtype), cu_seqlens_q=sds((batch + 1,), i32),
                max_seqlen_q=max_prompt, **paged, **common))
        out[("decode", kind)] = ("paged_attention", dict(
            q=sds((batch, 1, n, h), cfg.dtype), **paged, **common))
    return out


def generation_calls(cfg: GemmaConfig, prompt_lens, new_tokens: int, page_size: int,
                     prefill: str = "varlen"):
    """attention_calls for a generation of these prompts (pages as cache.init_cache
    allocates them)."""
    capacity = [n + new_tokens for n in prompt_lens]
    table, num_pages = allocate_pages(capacity, page_size)
    return attention_calls(cfg, batch=len(prompt_lens), total_prefill=sum(prompt_lens),
                           max_prompt=max(prompt_lens), num_pages=num_pages,
                           page_size=page_size, max_pages=table.shape[1], prefill=prefill)


def explain_paths(calls) -> dict:
    """{(phase, kind): None if the FA4 kernel takes the call, else the reason}."""
    return {key: jax_fa4.explain_call(fn, **kw) for key, (fn, kw) in calls.items()}


def count_kernel_calls(lowered) -> int:
    """FA4 kernel launches in a lowered program (jax.stages.Lowered): each attention
    call that takes the kernel lowers to one custom call (a loop body counts once)."""
    return lowered.as_text().count(KERNEL_TARGET)


def describe(reason) -> str:
    return "FA4 kernel" if reason is None else f"fallback: {reason}"


def check_all_fa4(cfg: GemmaConfig, reasons: dict, lowered: dict) -> list[str]:
    """Problems that mean some attention call did not take the FA4 kernel (empty list:
    every one did).  lowered: {phase: jax.stages.Lowered} of the jax_fa4 programs."""
    problems = [f"{phase} {kind} attention: {r}" for (phase, kind), r in reasons.items()
                if r is not None]
    for phase, low in lowered.items():
        n = count_kernel_calls(low)
        if n != cfg.num_layers:
            problems.append(f"{phase}: {n} FA4 kernel calls in the lowered program, expected "
                            f"{cfg.num_layers} (one per layer)")
    return problems
