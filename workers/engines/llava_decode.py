"""The LLaVA engine's decode steps, pipelined: the engine launches step t+1 (its input, step
t's sampled tokens, never leaves the device) before it waits for step t's tokens and hands
them to the requests, so detokenising, streaming and the step's bookkeeping run on the CPU
while the device computes.

A row that finished at step t rode along in step t+1 for nothing; that step's time is charged
to the rows still live in it, and a step whose rows had all finished is billed to nobody and
not counted as busy time.
"""

import torch

from workers.engines.device import Step, clock, to_device
from workers.engines.growing_cache import GrowingCache
from workers.engines.kv_cache import FixedCache


class PipelinedDecode:
    """Decode steps of `TransformersLlava`, which holds what they use: the batch (`_batch`),
    the step in flight (`_inflight`), the rows' next input tokens on the device (`_next`),
    the device, the meter and the step counters, and how tokens are chosen (`_choose`) and
    taken by their requests (`_accept`)."""

    @torch.inference_mode()
    def _decode(self) -> None:
        """Launch the next step (if a row needs one), then finish the one before it. A row
        with a grammar needs its last token before its next can be chosen: with one in the
        batch, the step before is finished while the next one's forward pass runs (on a GPU;
        on the CPU nothing would overlap, so it is finished first)."""
        batch = self._batch
        constrained = any(r.matcher is not None for r in batch.rows)
        if constrained and self.device.type != "cuda" and self._inflight is not None:
            self._complete(self._inflight)
            self._inflight = None
            self._drop_finished(batch)
        needed = any(1 + r.launched < r.max_new_tokens for r in batch.rows)
        # (with nothing in flight a row always needs one: its tokens are all handed out)
        launch = batch.rows and (needed or self._inflight is None)
        completing = self._inflight if constrained and launch else None
        step = self._launch(batch, completing) if launch else None
        if self._inflight is not None and completing is None:
            self._complete(self._inflight)
        self._inflight = step
        self._drop_finished(batch)

    def _drop_finished(self, batch: GrowingCache | FixedCache) -> None:
        keep = [i for i, r in enumerate(batch.rows) if not r.done.is_set()]
        if len(keep) < len(batch.rows):
            batch.keep(keep)
            self._next = self._next[to_device(keep, self.device)] if keep else None

    def _launch(self, batch: GrowingCache | FixedCache, completing: Step | None = None) -> Step:
        """Run a decode step over the batch and choose its tokens. `completing`: the step
        before, finished after this one's forward pass is launched and before its tokens are
        chosen (its tokens reach the rows' grammars)."""
        rows = list(batch.rows)
        started = clock(self.device)
        logits = batch.step(self._next)
        if completing is not None:
            self._complete(completing)
        tokens, scores = self._choose(rows, logits)
        host = tokens.to("cpu", non_blocking=True) if self.device.type == "cuda" else tokens
        for request in rows:
            request.launched += 1
        self._next = tokens
        scores = scores.to_host() if scores is not None else None
        return Step(rows, tokens, host, started, clock(self.device), scores)

    def _complete(self, step: Step) -> None:
        """Wait for a step's tokens; charge its time to its live rows, hand them their tokens."""
        step.wait()
        live = [r for r in step.rows if not r.done.is_set()]
        if live:  # a step of rows that had all finished was waste: nobody is billed for it
            self.meter.charge(step.seconds(), {r: 1.0 for r in live})
            self.decode_steps += 1
            self.decode_tokens += len(live)
        for row, (request, token) in enumerate(zip(step.rows, step.host.tolist(), strict=True)):
            if not request.done.is_set():
                self._accept(request, token, step.scores, row)
