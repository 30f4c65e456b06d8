"""Diagnosis experiments: why a backend's vectors disagree with the truth.

static      its own metadata (dimension, pooling, input limit) against the model profile
tokens      its tokenize route against the model's tokenizer on the probes in dispute
prompt      the truth re-embeds each way a prompt could go wrong (missing, doubled, another one)
truncation  only long probes disagree; where it cuts (the truth's vectors of the probe cut at likely limits)
pooling     reported by the backend, or reproduced from the model's GGUF
otherwise   a different model or different weights (never while most probe groups agree)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from backends.base import BackendInfo
from backends.errors import BackendError
from config.profiles import ModelProfile
from gateway.consistency.gather import ProbeIO, ProbeVectors, cosines
from gateway.consistency.judge import probe_groups
from gateway.consistency.pooling import POOLINGS, reproduce
from gateway.consistency.probes import Probe
from gateway.consistency.report import Finding, Report
from gateway.state import BackendState
from gateway.tokens import ModelTokenizer

log = logging.getLogger(__name__)


class Diagnosis:
    def __init__(
        self,
        profile: ModelProfile,
        io: ProbeIO,
        tokenizer: ModelTokenizer | None = None,
        gguf: Path | None = None,
    ) -> None:
        self.profile = profile
        self.io = io
        self.tokenizer = tokenizer  # the model's: probes at its limit, and where a backend truncates
        self.gguf = gguf
        # (backend, probe index) -> (its tokens, the model tokenizer's) for probes in dispute
        self.tokens: dict[tuple[str, int], tuple[int, int]] = {}

    def token_match(self) -> dict[str, dict[int, bool]]:
        """Per backend and disputed probe: whether its tokenization is the model's."""
        out: dict[str, dict[int, bool]] = {}
        for (name, i), (mine, model) in self.tokens.items():
            out.setdefault(name, {})[i] = mine == model
        return out

    async def token_evidence(
        self,
        results: dict[str, tuple[BackendState, ProbeVectors]],
        probes: list[Probe],
        space: ProbeVectors | None,
    ) -> None:
        """Short probes in dispute (some pair, or some backend and the pinned space, below warn_cosine):
        how many tokens each backend with a tokenize route makes of them, and the model's tokenizer."""
        if self.tokenizer is None:
            return
        sides = [v for _, v in results.values()] + ([space] if space is not None else [])
        disputed: dict[int, str | None] = {}
        for a_i, a in enumerate(sides):
            for b in sides[a_i + 1 :]:
                for (pname, i), c in cosines(a, b).items():
                    if c < self.profile.warn_cosine and not probes[i].long:
                        disputed.setdefault(i, pname)
        for i, pname in sorted(disputed.items())[:8]:
            prefix = self.profile.prompts.get(pname, "") if pname else ""
            text = prefix + probes[i].text
            model = self.tokenizer.counts([text])[0]
            for name, (st, _) in results.items():
                n = await self.io.tokens(st, text)
                if n is not None:
                    self.tokens[(name, i)] = (n, model)

    def static(self, st: BackendState, info: BackendInfo | None) -> list[Finding]:
        if info is None:
            return []
        p, name, out = self.profile, st.backend.name, []
        if info.dimension is not None and info.dimension != p.dimension:
            out.append(
                Finding(
                    name,
                    "dimension",
                    "error",
                    f"reports dimension {info.dimension}; the model profile says {p.dimension}",
                )
            )
        if info.pooling is not None and info.pooling != p.pooling:
            out.append(
                Finding(
                    name, "pooling", "error", f"reports pooling '{info.pooling}'; the model profile says '{p.pooling}'"
                )
            )
        if info.max_input_tokens is not None and info.max_input_tokens < p.max_input_tokens:
            out.append(
                Finding(
                    name,
                    "input_limit",
                    "info",
                    f"accepts at most {info.max_input_tokens} tokens per input (profile: {p.max_input_tokens}); longer "
                    "inputs are rejected there and served by another backend",
                )
            )
        return out

    def token_story(self, name: str, bad: list[int], probes: list[Probe]) -> str:
        """'tokenization differs on Hangul: 12 tokens vs 24 in the model's tokenizer (sunset-ko)' for each
        disagreeing probe where the backend's tokens differ from the model's."""
        parts = []
        for i in bad:
            counts = self.tokens.get((name, i))
            if counts is not None and counts[0] != counts[1]:
                where = ", ".join(probe_groups(probes[i])[1:])
                parts.append(
                    f"tokenization differs on {where}: {counts[0]} tokens vs {counts[1]} in the model's tokenizer "
                    f"({probes[i].name})"
                )
        return "; ".join(parts)

    async def diagnose(
        self,
        st: BackendState,
        res: ProbeVectors,
        ref_state: BackendState | None,
        cos: dict[tuple[str | None, int], float],
        probes: list[Probe],
        prompt_names: list[str | None],
        report: Report,
        lo: float,
        mean: float,
    ) -> list[Finding]:
        p, name = self.profile, st.backend.name
        if any(f.backend == name and f.kind in ("dimension",) for f in report.findings):
            return []
        # Prompt: re-embed on the reference each way the prompt could have gone wrong.
        if p.prompts and ref_state is not None and ref_state is not st and not ref_state.backend.applies_prompt:
            found = await self._prompt_variants(st, res, ref_state, probes, prompt_names)
            if found:
                return found
        # Truncation: short probes agree, only long ones do not.
        short = [c for (pn, i), c in cos.items() if not probes[i].long]
        long_bad = [probes[i].name for (pn, i), c in cos.items() if probes[i].long and c < p.agree_cosine]
        if short and min(short) >= p.agree_cosine and long_bad and ref_state is not None:
            at = await self._truncation_point(st, res, ref_state, cos, probes)
            if at is not None:
                return [
                    Finding(
                        name,
                        "truncation",
                        "error",
                        f"truncation at {at} tokens: its vectors for inputs at the model's limit "
                        f"({p.max_input_tokens} tokens) are the model's vectors of their first {at} tokens, "
                        "although it does not declare that limit; long texts would land elsewhere in the space",
                    )
                ]
        if short and min(short) >= p.agree_cosine and long_bad:
            return [
                Finding(
                    name,
                    "truncation",
                    "error",
                    f"short probes agree (min {min(short):.5f}) but long ones do not "
                    f"({', '.join(sorted(set(long_bad)))}): it truncates long inputs differently (e.g. TEI "
                    "auto-truncate), so long texts would land elsewhere in the space",
                )
            ]
        # Pooling: reported by the backend, or reproduced from the model's GGUF.
        static = [f for f in report.findings if f.backend == name and f.kind == "pooling"]
        if static:
            return [
                Finding(name, "pooling", "error", static[0].message + f"; its vectors disagree (min cosine {lo:.5f})")
            ]
        if self.gguf is not None:
            found_pooling = await self._reproduce_pooling(res, probes, prompt_names)
            if found_pooling:
                pooling, score = found_pooling
                return [
                    Finding(
                        name,
                        "pooling",
                        "error",
                        f"pools with '{pooling}' (its vectors match the model pooled with '{pooling}' at min cosine "
                        f"{score:.5f}); the model profile says '{p.pooling}' — start it with --pooling {p.pooling}",
                    )
                ]
        hint = (
            ""
            if self.gguf
            else " (or another pooling: llama.cpp does not report its pooling; set the model's reference_gguf "
            "so the checker can tell)"
        )
        if lo < p.error_cosine:
            return [
                Finding(
                    name,
                    "different_model",
                    "error",
                    f"vectors disagree on every kind of probe (min cosine {lo:.5f}, mean {mean:.5f}) and no prompt, "
                    f"truncation or pooling variant explains it: a different model or different weights with the same "
                    f"dimension{hint}",
                )
            ]
        return [
            Finding(
                name,
                "different_model",
                "warning",
                f"min cosine {lo:.5f} (mean {mean:.5f}) is below the agreement threshold {p.agree_cosine} but above "
                f"{p.error_cosine}: a coarser quantization or a slightly different model{hint}",
            )
        ]

    async def _truncation_point(
        self,
        st: BackendState,
        res: ProbeVectors,
        ref_state: BackendState,
        cos: dict[tuple[str | None, int], float],
        probes: list[Probe],
    ) -> int | None:
        """Where a backend cuts inputs it does not declare it cuts: its vector of the at-limit probe against
        the reference's vectors of that probe cut at likely limits (the model's tokenizer cuts them)."""
        if self.tokenizer is None:
            return None
        bad = [(pn, i) for (pn, i), c in cos.items() if probes[i].name == "at-limit" and c < self.profile.agree_cosine]
        if not bad:
            return None
        pname, i = bad[0]
        prefix = self.profile.prompts.get(pname, "") if pname else ""
        total = probes[i].tokens or 0
        candidates = [n for n in (32, 64, 128, 192, 256, 384, 512, 1024) if n < total]
        if not candidates:
            return None
        cut = [self.tokenizer.fit(prefix, [probes[i].text], n, "right").texts[0] for n in candidates]
        try:
            ref = await self.io.embed(ref_state, [self.io.send(ref_state, prefix, t) for t in cut], pname)
        except BackendError:
            return None
        scores = ref @ res.rows[(pname, i)]
        best = int(np.argmax(scores))
        return candidates[best] if float(scores[best]) >= self.profile.warn_cosine else None

    async def _prompt_variants(
        self,
        st: BackendState,
        res: ProbeVectors,
        ref_state: BackendState,
        probes: list[Probe],
        prompt_names: list[str | None],
    ) -> list[Finding]:
        p = self.profile
        short = [i for i, pr in enumerate(probes) if not pr.long]
        for pname in prompt_names:
            if pname is None:
                continue
            prefix = p.prompts[pname]
            variants = {"prompt_missing": "", "prompt_doubled": prefix + prefix}
            variants.update({f"prompt_wrong:{other}": pre for other, pre in p.prompts.items() if other != pname})
            for kind, pre in variants.items():
                try:
                    vecs = await self.io.embed(ref_state, [pre + probes[i].text for i in short], None)
                except BackendError:
                    return []
                vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
                score = min(float(vecs[j] @ res.rows[(pname, i)]) for j, i in enumerate(short))
                if score >= p.agree_cosine:
                    return [self._prompt_finding(st, kind, pname, prefix, score)]
        return []

    def _prompt_finding(self, st: BackendState, kind: str, pname: str, prefix: str, score: float) -> Finding:
        name, backend = st.backend.name, st.backend
        if kind == "prompt_doubled":
            why = (
                'TEI must run without --default-prompt/--default-prompt-name when prompt_mode = "gateway"'
                if backend.kind == "tei"
                else "the backend adds the prompt and so does the gateway"
            )
            msg = (
                f"applies the '{pname}' prompt twice ({prefix!r} + {prefix!r} + text matches at min cosine "
                f"{score:.5f}): {why}"
            )
            return Finding(name, "prompt_doubled", "error", msg)
        if kind == "prompt_missing":
            why = {
                "elastic": "the inference service does not apply the prompt for this input_type; check input_types",
                "tei": 'TEI in prompt_mode = "backend" lacks this prompt in its prompts',
            }.get(backend.kind, "no prompt reaches the model")
            msg = f"applies no prompt for '{pname}' (the bare text matches at min cosine {score:.5f}): {why}"
            return Finding(name, "prompt_missing", "error", msg)
        other = kind.split(":", 1)[1]
        msg = f"applies the '{other}' prompt where '{pname}' was asked for (matches at min cosine {score:.5f})"
        return Finding(name, "prompt_wrong", "error", msg)

    async def _reproduce_pooling(
        self, res: ProbeVectors, probes: list[Probe], prompt_names: list[str | None]
    ) -> tuple[str, float] | None:
        assert self.gguf is not None
        pname = prompt_names[0]
        prefix = self.profile.prompts.get(pname, "") if pname else ""
        short = [i for i, pr in enumerate(probes) if not pr.long]
        for pooling in (x for x in POOLINGS if x != self.profile.pooling):
            try:
                vecs = await reproduce(self.gguf, pooling, [prefix + probes[i].text for i in short])
            except Exception as exc:  # a scratch server that will not start must not break the check
                log.warning("could not reproduce pooling %s from %s: %s", pooling, self.gguf, exc)
                return None
            score = min(float(vecs[j] @ res.rows[(pname, i)]) for j, i in enumerate(short))
            if score >= self.profile.agree_cosine:
                return pooling, score
        return None
