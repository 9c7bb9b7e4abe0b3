"""Batched greedy generation over (image, question) pairs at a chosen N_l and reducer.

gpt-fast style: a static KV cache, one prefill and a loop of single-token decode steps, and
per-stage timings (vision encode, reduce, LM prefill, time to first token, decode tokens/s)
plus peak memory. Prompts are left-padded so that a sample's answer never depends on the
batch it is in: its RoPE positions start at 0 and padded cache slots are masked out.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokengine.models import VLM
from tokengine.models.preprocess import preprocess_images
from tokengine.models.reducer import (
    check_reduction,
    question_guided_scores,
    reduce_tokens,
)

LLAVA_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
IMAGE_TOKEN = "<image>"
QUESTION_READERS = ("pool-question", "fusion")  # reducers that look at the question


@dataclass
class GenerationResult:
    """Answers and measurements of one :meth:`Engine.generate` call."""

    texts: list[str]
    token_ids: list[list[int]]
    timings: dict[str, float]  # totals and rates over the call, see Engine.generate
    ttft_ms: list[float] = field(default_factory=list)  # per sample: its batch's TTFT
    image_tokens: list[int] = field(default_factory=list)  # image slots each prompt carried


class _StageClock:
    """Wall-clock stage timer; on CUDA, device events so asynchronous kernels are counted."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def elapsed_ms(self) -> dict[str, float]:
        """Milliseconds from each mark to the next, keyed by the later mark's name."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


class Engine:
    """Greedy VLM generation with a static KV cache.

    Args:
        vlm: the model (:class:`tokengine.models.VLM`), already on its device and dtype.
        tokenizer: a ``tokenizers.Tokenizer`` whose vocabulary has ``<image>`` at the model's
            ``image_token_index``; defaults to the one loaded with the model.
        template: the prompt with ``<image>`` and ``{question}``; LLaVA-1.5's by default.
        compile: run the vision encoder, the LM prefill and each decode step through
            ``torch.compile`` (gpt-fast's trick: fused graphs instead of ~100 small ops per
            call; with Inductor's C++ wrapper, so no Python runs between a graph's kernels).
            Shapes are bucketed so that batches of similar prompts reuse the graphs: prompts
            are left-padded to a multiple of ``PROMPT_BUCKET`` tokens (padding is masked out,
            as in any batch) and the KV cache is sized in multiples of ``CACHE_BUCKET`` slots.
            The first batch of each (batch size, bucket) compiles (tens of seconds on a CPU).
            Answers are the same as without it.
    """

    PROMPT_BUCKET = 32
    CACHE_BUCKET = 256

    def __init__(
        self, vlm: VLM, tokenizer=None, template: str = LLAVA_TEMPLATE, compile: bool = False
    ) -> None:
        self.vlm = vlm
        self.compiled = compile
        fns = (vlm.encode_images, self._prefill_step, self._decode_step)
        if compile:
            options = {"cpp_wrapper": True}
            fns = tuple(torch.compile(f, dynamic=False, options=options) for f in fns)
        self._encode, self._prefill, self._step = fns
        self.tokenizer = tokenizer if tokenizer is not None else vlm.tokenizer
        if self.tokenizer is None:
            raise ValueError("tokenizer is required: the model directory has no tokenizer.json")
        image_id = self.tokenizer.token_to_id(IMAGE_TOKEN)
        if image_id != vlm.config.image_token_index:
            raise ValueError(
                f"the tokenizer maps {IMAGE_TOKEN!r} to {image_id}, but the model's "
                f"image_token_index is {vlm.config.image_token_index}"
            )
        if IMAGE_TOKEN not in template or "{question}" not in template:
            raise ValueError(f"template must contain {IMAGE_TOKEN!r} and '{{question}}'")
        self.template = template
        self.eos_ids = set(vlm.config.text.eos_token_ids)
        self._eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Engine:
        """Load a model directory (see :meth:`VLM.from_pretrained` for ``dtype``/``device``)."""
        return cls(VLM.from_pretrained(path, **kwargs))

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    def check_tokens(self, tokens: int | None, reducer: str) -> int:
        """The N_l that :meth:`generate` with these ``tokens`` and ``reducer`` hands the LM.

        Raises the error generation would raise (ValueError, or TypeError for a non-int
        ``tokens``) without running anything, so that a CLI can refuse a bad request before
        it loads data or spends time on other points.
        """
        n = self.vlm.config.num_image_tokens
        if tokens is None:
            tokens = n
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            raise TypeError(f"tokens must be an int or None, got {tokens!r}")
        if not 1 <= tokens <= n:
            raise ValueError(f"tokens must be in 1..{n} (this model's image tokens), got {tokens}")
        check_reduction(reducer, tokens, n, fusion=self.vlm.reducer)
        return tokens

    def generate(
        self,
        images: Sequence,
        questions: Sequence[str],
        *,
        tokens: int | None = None,
        reducer: str = "none",
        max_new_tokens: int = 16,
        batch_size: int = 8,
    ) -> GenerationResult:
        """Answer each (image, question) greedily.

        Args:
            images: PIL images, HxWx3 uint8 arrays or image file paths.
            questions: one string per image.
            tokens: N_l, the image tokens the LM sees; None means all of them.
            reducer: one of ``tokengine.models.reducer.REDUCERS``.
            max_new_tokens: the answer length limit; generation also stops at EOS.
            batch_size: samples per forward pass (answers do not depend on it).

        Returns:
            :class:`GenerationResult` with texts, generated ids (EOS excluded), per-sample TTFT
            and ``timings``: ``vision_ms``, ``reduce_ms``, ``prefill_ms``, ``decode_ms``
            (sums over batches), ``decode_tokens_per_s``, ``samples``, ``peak_memory_mb``.

        Raises:
            ValueError / TypeError on bad arguments, before any work; among them a prompt (with
            its N_l image tokens) that leaves fewer than ``max_new_tokens`` of the LM's
            ``max_position_embeddings``.
        """
        if len(questions) == 0:
            raise ValueError("questions must not be empty")
        if len(images) != len(questions):
            raise ValueError(
                f"images and questions must have equal length, got {len(images)} and "
                f"{len(questions)}"
            )
        if not all(isinstance(q, str) for q in questions):
            raise TypeError("questions must be strings")
        n_image = self.check_tokens(tokens, reducer)
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        prompts = [self._prompt_ids(q, n_image) for q in questions]
        self._check_length(prompts, n_image, max_new_tokens)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = GenerationResult([], [], {})
        totals = dict.fromkeys(("vision_ms", "reduce_ms", "prefill_ms", "decode_ms"), 0.0)
        decoded = 0
        for start in range(0, len(questions), batch_size):
            stop = start + batch_size
            ids, steps, ttft, stages = self._generate_batch(
                images[start:stop],
                questions[start:stop],
                prompts[start:stop],
                n_image,
                reducer,
                max_new_tokens,
            )
            for key in totals:
                totals[key] += stages[key]
            decoded += steps * len(ids)  # tokens computed by decode steps (batch-wide)
            result.token_ids += ids
            result.texts += [
                self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids
            ]
            result.ttft_ms += [ttft] * len(ids)
            result.image_tokens += [n_image] * len(ids)
        result.timings = {
            **totals,
            "decode_tokens_per_s": decoded / (totals["decode_ms"] / 1e3) if decoded else 0.0,
            "samples": float(len(questions)),
            "peak_memory_mb": _peak_memory_mb(self.device),
        }
        return result

    @torch.inference_mode()
    def _generate_batch(self, images, questions, prompts, n_image, reducer, max_new_tokens):
        vlm, device = self.vlm, self.device
        self._eos = self._eos.to(device)
        clock = _StageClock(device)
        clock.mark("start")
        pixels = preprocess_images(images, vlm.image_processor).to(device, vlm.dtype)
        features = self._encode(pixels)  # (B, N, Dv)
        clock.mark("vision_ms")
        question = cu = scores = None
        if reducer in QUESTION_READERS:
            question, cu = self._question_embeddings(questions)
        if reducer == "pool-question":
            scores = question_guided_scores(vlm.project(features), question, cu)
        reduced = reduce_tokens(
            reducer,
            features,
            n_image,
            fusion=vlm.reducer,
            question=question,
            cu_seqlens=cu,
            scores=scores,
        )
        image_embeds = vlm.project(reduced)  # (B, N_l, Dlm)
        clock.mark("reduce_ms")

        B, S = len(prompts), max(len(p) for p in prompts)
        if self.compiled:
            S = -(-S // self.PROMPT_BUCKET) * self.PROMPT_BUCKET
        pad = [S - len(p) for p in prompts]
        ids = torch.zeros(B, S, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, pad[b] :] = torch.tensor(p, device=device)
        embeds = vlm.lm.embed(ids)
        is_image = ids == vlm.config.image_token_index
        embeds[is_image] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)

        total = S + max_new_tokens
        if self.compiled:
            total = -(-total // self.CACHE_BUCKET) * self.CACHE_BUCKET
        vlm.lm.setup_cache(B, total, vlm.dtype, device)
        pad_t = torch.tensor(pad, device=device)
        key_mask = torch.arange(total, device=device)[None, :] >= pad_t[:, None]
        slots = torch.arange(S, device=device)
        positions = (slots[None, :] - pad_t[:, None]).clamp(min=0)
        next_ids, done = self._prefill(embeds, slots, positions, key_mask)
        clock.mark("prefill_ms")  # the prefill step also picks the first answer token
        out = [next_ids]
        for step in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            slot = torch.tensor([S + step], device=device)
            next_ids, eos = self._step(next_ids, slot, pad_t, key_mask)
            out.append(next_ids)
            done |= eos
        clock.mark("decode_ms")
        stages = clock.elapsed_ms()
        ttft = sum(stages[k] for k in ("vision_ms", "reduce_ms", "prefill_ms"))
        generated = torch.stack(out, 1).tolist()
        steps = len(out) - 1
        return [self._until_eos(g) for g in generated], steps, ttft, stages

    def _prefill_step(self, embeds, slots, positions, key_mask):
        """Prompts (B, S, D) at cache slots (S,) -> the first answer tokens (B,), EOS or not."""
        logits = self.vlm.lm(embeds, slots, positions, key_mask, last_only=True)
        next_ids = logits[:, -1].argmax(-1)
        return next_ids, self._is_eos(next_ids)

    def _decode_step(self, ids, slot, pad, key_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy step: the last tokens (B,) written at cache slot (1,) of rows left-padded
        by pad (B,) -> the next tokens (B,) and whether each is an EOS (B,)."""
        lm = self.vlm.lm
        positions = slot[None, :] - pad[:, None]
        next_ids = lm(lm.embed(ids[:, None]), slot, positions, key_mask)[:, -1].argmax(-1)
        return next_ids, self._is_eos(next_ids)

    def _question_embeddings(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The questions' token embeddings packed (T, Dlm), with cu_seqlens (B+1,) int32."""
        ids = [self.tokenizer.encode(q, add_special_tokens=False).ids for q in questions]
        cu = torch.tensor([0] + [len(q) for q in ids]).cumsum(0).to(torch.int32)
        flat = torch.tensor([t for q in ids for t in q], dtype=torch.long, device=self.device)
        return self.vlm.lm.embed(flat), cu.to(self.device)

    def _check_length(self, prompts: list[list[int]], n_image: int, max_new_tokens: int) -> None:
        """Every prompt (ids, image slots expanded) and its answer must fit the LM's positions
        (RoPE would run past them, as in transformers, but on positions the model never saw)."""
        limit = self.vlm.config.text.max_position_embeddings
        for i, p in enumerate(prompts):
            need = len(p) + max_new_tokens
            if need > limit:
                raise ValueError(
                    f"questions[{i}] needs {need} positions (its prompt with {n_image} image "
                    f"tokens, plus max_new_tokens={max_new_tokens}); this LM has "
                    f"{limit} (max_position_embeddings)"
                )

    def _prompt_ids(self, question: str, n_image: int) -> list[int]:
        """The prompt's ids with the single ``<image>`` placeholder expanded to N_l slots."""
        ids = self.tokenizer.encode(self.template.format(question=question)).ids
        image_id = self.vlm.config.image_token_index
        if ids.count(image_id) != 1:
            raise ValueError(
                f"the prompt must hold exactly one {IMAGE_TOKEN}; the question "
                f"may not contain it: {question!r}"
            )
        at = ids.index(image_id)
        return ids[:at] + [image_id] * n_image + ids[at + 1 :]

    def _is_eos(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids[:, None] == self._eos).any(-1)

    def _until_eos(self, ids: list[int]) -> list[int]:
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[:i]
        return ids


def _peak_memory_mb(device: torch.device) -> float:
    """Peak device memory on CUDA; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
