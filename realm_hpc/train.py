"""REALM pretraining: ICT warm start -> reader warm-up -> REALM with asynchronous index refresh -> evaluation.

Held-out evaluation reads the dev split wherever the run decides or looks along the way (ICT's early stopping,
every mid-run evaluation) and the test split twice only: the start index and the end (PretrainData.heldout).

Phases share one model and one run directory; a checkpoint after ICT and every `train.checkpoint_every` steps
lets `--resume` continue a killed run with the same losses an uninterrupted run has.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from realm_hpc import preempt
from realm_hpc.checkpoint import (atomic_write, atomic_write_json, load_checkpoint, load_weights,
                                  save_trainer_checkpoint, set_trainer_rng_state)
from realm_hpc.config import Config, ConfigError
from realm_hpc.data.examples import Batch, PretrainData
from realm_hpc.device import group_device
from realm_hpc.dist import TrainerGroup, barrier, broadcast_from_trainer0, mean_over_trainers, print0
from realm_hpc.evaluate import (bm25_retrieved, gold_recalls, heldout_metrics, mlm_accuracy, mlm_token_hits,
                                paired_sign_test, per_example, per_token, recall_at_k, recall_ks, retrieval_metrics,
                                share)
from realm_hpc.metrics import MetricsLogger, plot_curves
from realm_hpc.models.encoders import pretrained_dir
from realm_hpc.models.realm import Realm
from realm_hpc.optim import build_optimizer, check_step_plan, make_stepper, micro_batch_size
from realm_hpc.retrieval.index import LIVE_DTYPES, LiveIndex
from realm_hpc.retrieval.refresh import InlineRefresher
from realm_hpc.retrieval.sharded import build_index, full_embeddings, index_from_full


SPAN_HITS_FILE = "mlm_span_hits.npy"  # a finished run's hits per test span (evaluate.per_example), to pair runs


class TrainingError(RuntimeError):
    pass


@dataclass
class RunState:
    """Everything besides tensors that a resumed run needs (saved inside the checkpoint)."""
    step: int = 0  # REALM loop steps done
    ict_done: bool = False
    ict_steps: int = 0
    test_recall_start: float = float("nan")  # recall@k of the start index on test (the summary's start)
    test_recalls_start: dict = field(default_factory=dict)  # {j: recall@j} for j in evaluate.recall_ks(k)
    test_span_in_top_k_start: float = float("nan")
    dev_recall_start: float = float("nan")  # ICT's early stopping starts from this
    dev_recall_after_ict: float = float("nan")
    index_versions: int = 0
    max_staleness: int = 0
    staleness_sum: int = 0  # over the loop's steps: the summary's mean staleness
    trainer_wait_s: float = 0.0
    realm_loop_s: float = 0.0  # the loop's steps alone (index wait included; evaluation and checkpoints not)
    wall_s: float = 0.0  # wall time of earlier (killed) attempts
    refresh_steps: list[int] = field(default_factory=list)


def fresh_index(model: Realm, data: PretrainData, cfg: Config, version: int, step: int,
                group: TrainerGroup = TrainerGroup()) -> LiveIndex:
    """The index of the current doc encoder; several trainers split the encoding (collective)."""
    return build_index(model.retriever.doc, data.blocks, cfg.refresh.batch_size, version, step, group,
                       cfg.index.sharded, dtype=LIVE_DTYPES[cfg.index.live_dtype])


def check_corpus_sizes(cfg: Config, data: PretrainData) -> None:
    """Knobs the corpus must be large enough for: refused at the start with the key named, not deep in a search."""
    where = f"data.corpus={cfg.data.corpus}" if cfg.data.corpus else "the embedded world"
    n = len(data.blocks)
    wants = [("retrieval.k", cfg.retrieval.k)]
    if cfg.train.reader_warmup_steps > 0:
        wants.append(("train.reader_warmup_k", cfg.train.reader_warmup_k))
    for key, k in wants:
        if k > n - 1:
            raise ConfigError(f"{key}={k} is more than {where} can return: {n} document(s), {n - 1} besides a "
                              "query's own")
    sentences = len(data.train.text)
    if sentences == 0:
        held = len(data.heldout("test")) + len(data.heldout("dev"))
        raise ConfigError(f"{where} has no training sentence ({held} held out for evaluation by data.eval_examples "
                          "and data.dev_examples)")
    if cfg.ict.steps > 0 and cfg.ict.batch_size > sentences:
        raise ConfigError(f"ict.batch_size={cfg.ict.batch_size} is more than the {sentences} training sentences of "
                          f"{where}")


def start_index(model: Realm, data: PretrainData, cfg: Config, group: TrainerGroup = TrainerGroup(),
                device: torch.device | str | None = None) -> LiveIndex:
    """Index v0 of the untrained retriever. With `model.proj_init=pca` the corpus is encoded up to the projection,
    the projection (of both encoders) becomes the top principal directions of those vectors, and the index is their
    projection: one pass over the corpus either way."""
    if cfg.model.proj_init != "pca":
        return fresh_index(model, data, cfg, 0, 0, group)
    pooled = full_embeddings(build_index(model.retriever.doc, data.blocks, cfg.refresh.batch_size, 0, 0, group,
                                         sharded=False, pooled=True))
    emb = model.retriever.init_projection_pca(pooled, cfg.model.pca_score_scale)
    if group.distributed:  # nodes' SVDs may differ in the last bits: all trainers take trainer 0's directions
        w = broadcast_from_trainer0(model.retriever.doc.proj.weight.data, group)
        for enc in (model.retriever.query, model.retriever.doc):
            enc.proj.weight.data.copy_(w)
        emb = pooled.to(w.device) @ w.T
    print0(f"model.proj_init=pca: projection = the top {cfg.model.proj_dim} principal directions of the corpus's "
           f"{pooled.shape[1]}-d vectors")
    return index_from_full(emb, 0, 0, group, cfg.index.sharded, device, LIVE_DTYPES[cfg.index.live_dtype])


def rebuild_start(cfg: Config, data: PretrainData,
                  frozen: tuple[Realm, torch.Tensor] | None = None) -> tuple[Realm, torch.Tensor]:
    """The retriever a run with ict.steps=0 starts REALM from, rebuilt (`build-index --start`), with the start index's
    embeddings [N, D]: the run's seeded initialisation (or pretrained weights) and, with model.proj_init=pca, the same
    projection (one pass over the corpus). `frozen`: the run's (model, index) when its doc encoder was frozen; both
    encoders start as one (Retriever, init_projection_pca) and the doc encoder kept its start, so the start is the
    doc encoder on both sides and that index, and nothing is encoded. An ICT-trained start is kept nowhere: refused."""
    from realm_hpc.config import ConfigError

    if cfg.ict.steps > 0:
        raise ConfigError(f"build-index --start: the run trained its retriever with ICT first (ict.steps="
                          f"{cfg.ict.steps}); only a run with ict.steps=0 starts REALM from weights its config rebuilds")
    if frozen is not None:
        model, embeddings = frozen
        model.retriever.query.load_state_dict(model.retriever.doc.state_dict())
        return model, embeddings
    torch.manual_seed(cfg.train.seed)  # as Pretrainer.run before it builds the model
    model = Realm(cfg, data.vocab_size).eval()
    return model, full_embeddings(start_index(model, data, cfg))


def batch_rows(batch: Batch, a: int, b: int) -> Batch:
    """Rows [a, b) of a batch: a trainer's micro batch of the global one."""
    return Batch(batch.query_ids[a:b], batch.query_mask[a:b], batch.x_tokens[a:b], batch.positions[a:b],
                 batch.targets[a:b], batch.target_mask[a:b], batch.source[a:b])


class Pretrainer:
    """One trainer's run. With several trainers (`group`) every trainer runs this same code in lockstep: ICT is
    replicated, REALM steps are data-parallel (each trainer takes its slice of the global batch of a step), the
    index is built by splitting the corpus, and trainer 0 alone writes metrics, checkpoints and the summary."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, refresher_factory=None,
                 group: TrainerGroup = TrainerGroup()):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.refresher_factory = refresher_factory  # (data) -> refresher; None = inline
        self.group = group
        check_step_plan(cfg, group.size)  # a batch the trainers cannot split, a bad DeepSpeed JSON: here, not after ICT
        if cfg.model.pretrained:
            pretrained_dir(cfg.model.pretrained)  # before its tokenizer is read for the data
        self.device = group_device(group, cfg.train.device)
        self.t0 = time.perf_counter()
        self.untrained_index: LiveIndex | None = None  # set by ict() when ICT is off (see realm())

    # -- the whole run -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed)
        data = self.data = self._data()
        check_corpus_sizes(cfg, data)
        model = self.model = Realm(cfg, data.vocab_size).to(self.device)  # initialised on the CPU: same weights
        print0(f"training on {self.device} ({self.group.size} trainer(s), train.device={cfg.train.device})")
        state = RunState()
        ckpt = None
        if self.resume and (self.run_dir / "checkpoint").exists():
            ckpt = load_checkpoint(self.run_dir / "checkpoint")  # CPU tensors, whatever device wrote them
            load_weights(model, ckpt["model"], self.run_dir / "checkpoint")
            state = RunState(**ckpt["run_state"])
            print0(f"resuming at step {state.step} (ict done: {state.ict_done})")
        self.state = state
        # A resume without a checkpoint (stopped during ICT) redoes ICT: drop the stopped attempt's rows (-1).
        self.log = MetricsLogger(self.run_dir, enabled=self.group.rank == 0,
                                 resume_step=self._global_step() if ckpt else -1 if self.resume else None)
        try:
            if not state.ict_done:
                self.ict()
                # The end-of-ICT checkpoint: weights, RNG and (ICT off) the untrained index REALM starts from.
                self.checkpoint(live=self.untrained_index, stepper=None)
            live = self.realm(ckpt)
            summary = self.finish(live)
        finally:
            self.log.close()
        return summary

    def _data(self) -> PretrainData:
        """Trainer 0 builds run_dir/data (tokenizer, block store) if missing; the others open it after."""
        if not self.group.distributed:
            return PretrainData(self.cfg, self.run_dir)
        data = PretrainData(self.cfg, self.run_dir) if self.group.rank == 0 else None
        barrier(self.group)
        return data or PretrainData(self.cfg, self.run_dir, build=False)

    def _global_step(self) -> int:
        return self.state.ict_steps + self.state.step

    # -- ICT warm start --------------------------------------------------------------------------------------
    def ict(self) -> None:
        cfg, data, model, state = self.cfg, self.data, self.model, self.state
        k = cfg.retrieval.k
        start = self.start_index()
        # One of the two reads of test (the end is the other): where the run starts, reported in the summary.
        state.test_recalls_start, reach = retrieval_metrics(model, data, start, k, split="test")
        state.test_recall_start = state.test_recalls_start[k]
        state.test_span_in_top_k_start = share(reach)
        dev_recalls, _ = retrieval_metrics(model, data, start, k, split="dev")
        state.dev_recall_start = dev_recalls[k]
        print0(f"recall@{k} at start: test {state.test_recall_start:.3f} (chance {data.chance_recall(k, 'test'):.3f}), "
               f"dev {state.dev_recall_start:.3f}; masked span in a top-{k} doc (test): "
               f"{state.test_span_in_top_k_start:.3f}")
        self.log.log(0, phase="ict", test_recall_at_k=state.test_recall_start, **_dev_recall_row(dev_recalls, k))
        state.dev_recall_after_ict = state.dev_recall_start
        if cfg.ict.steps <= 0:
            state.ict_done = True
            self.untrained_index = start  # REALM starts from these very weights: no second encode of the corpus
            return
        opt = torch.optim.AdamW(model.retriever.parameters(), lr=cfg.ict.lr, weight_decay=cfg.optim.weight_decay)
        best, stalls = state.dev_recall_start, 0
        bar = tqdm(range(cfg.ict.steps), desc="ict", leave=False, disable=self.group.rank != 0)
        for step in bar:
            signum = preempt.requested_by_any(self.group)
            if signum:  # ICT keeps no optimizer state in checkpoints: a resume restarts it
                raise preempt.Preempted(signum, state.ict_steps, checkpointed=False)
            queries, blocks = data.ict_batch(step, cfg.ict.batch_size, cfg.train.seed, cfg.ict.keep_sentence_prob)
            dev = self.device
            q = model.retriever.query(queries["input_ids"].to(dev), queries["attention_mask"].to(dev))
            g = model.retriever.doc(blocks["input_ids"].to(dev), blocks["attention_mask"].to(dev))
            logits = q @ g.T
            loss = F.cross_entropy(logits, torch.arange(len(q), device=dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.retriever.parameters(), cfg.optim.grad_clip)
            opt.step()
            state.ict_steps = step + 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if state.ict_steps % cfg.train.log_every == 0:
                self.log.log(state.ict_steps, phase="ict", ict_loss=loss.item())
            if state.ict_steps % cfg.ict.eval_every == 0 or state.ict_steps == cfg.ict.steps:
                recall = recall_at_k(model, data, fresh_index(model, data, cfg, 0, 0, self.group), k, split="dev")
                self.log.log(state.ict_steps, phase="ict", dev_recall_at_k=recall)
                state.dev_recall_after_ict = recall
                # ICT has converged when recall stops rising (`patience` evaluations without a real gain).
                stalls = stalls + 1 if recall < best + 0.005 else 0
                best = max(best, recall)
                if stalls >= cfg.ict.patience:
                    break
        # The last ICT gradient would otherwise be added to REALM's first one (and move the retriever during a
        # warm-up that freezes it); a run resumed from the end-of-ICT checkpoint has no such leftover either.
        opt.zero_grad(set_to_none=True)
        state.ict_done = True
        print0(f"dev recall@{k} after ICT ({state.ict_steps} steps): {state.dev_recall_after_ict:.3f}")

    def start_index(self) -> LiveIndex:
        return start_index(self.model, self.data, self.cfg, self.group, self.device)

    # -- REALM -------------------------------------------------------------------------------------------------
    def realm(self, ckpt: dict | None) -> LiveIndex:
        cfg, data, model, state, group = self.cfg, self.data, self.model, self.state, self.group
        k = cfg.retrieval.k
        retriever_lr = cfg.optim.lr * cfg.optim.retriever_lr_scale
        # The end-of-ICT checkpoint (no optimizer yet) was the last thing before this: its RNG state is the one the
        # uninterrupted run enters REALM with, before anything below (a DeepSpeed engine) draws from it.
        in_realm = ckpt is not None and ckpt["run_state"]["step"] > 0
        if ckpt is not None and not in_realm:
            set_trainer_rng_state(ckpt, group)
        if cfg.train.freeze_doc_encoder:  # before the optimizer is built: the doc encoder stays out of it
            model.freeze_doc_encoder()
        stepper = make_stepper(model, cfg, retriever_lr, group.size)
        micro, accum = micro_batch_size(cfg, group.size), cfg.train.grad_accum
        idx = ckpt.get("index") if ckpt is not None else None
        if in_realm:
            stepper.load(ckpt, self.run_dir)
            live = index_from_full(idx["embeddings"], idx["version"], idx["weights_step"], group, cfg.index.sharded,
                                   self.device, LIVE_DTYPES[cfg.index.live_dtype])
            set_trainer_rng_state(ckpt, group)
        else:
            if idx is not None:  # ICT off: the untrained index, saved in the end-of-ICT checkpoint
                live = index_from_full(idx["embeddings"], 1, idx["weights_step"], group, cfg.index.sharded,
                                       self.device, LIVE_DTYPES[cfg.index.live_dtype])
            elif self.untrained_index is not None:
                live, self.untrained_index = self.untrained_index, None
                live.swap(replace(live.snapshot, version=1))
            else:
                live = fresh_index(model, data, cfg, 1, state.step, group)
            state.index_versions = 1
        refresher = (self.refresher_factory(data) if self.refresher_factory
                     else InlineRefresher(data.blocks, cfg.refresh.every, cfg.refresh.batch_size, group,
                                          cfg.index.sharded))
        bar = tqdm(range(state.step, cfg.train.steps), desc="realm", leave=False, initial=state.step,
                   total=cfg.train.steps, disable=group.rank != 0)
        window, window_wait, window_s, warned_version = [], 0.0, 0.0, None
        window_held = []  # train.retriever_span_gate: per micro batch, the share of queries that train the retriever
        try:
            for step in bar:
                t_step = time.perf_counter()
                row = {}
                event = refresher.step_boundary(step, model.retriever.doc, live)
                if event.swapped:
                    state.index_versions += 1
                    state.refresh_steps.append(step)
                    self.log.mark_event(self._global_step(), "refresh")
                    row.update(refresh_encode_s=event.encode_s, refresh_docs_per_s=event.docs_per_s)
                    if event.shards:  # [first row, end row, docs/s] per refresher
                        row.update(refresh_shards=event.shards)
                if event.lost:
                    print0(f"warning: step {step}: refresher lost (MPI reported a dead rank, or none answered within "
                           f"refresh.timeout_s={cfg.refresh.timeout_s:g} s); training goes on with index "
                           f"v{live.version}, staleness grows")
                    row.update(refresher_lost=1)
                if event.respawned:
                    print0(f"step {step}: started {event.respawned} replacement refresher(s) (MPI_Comm_spawn); "
                           "index refreshes resume")
                    row.update(refresher_respawned=event.respawned)
                state.trainer_wait_s += event.wait_s
                window_wait += event.wait_s
                # refresh.every=0 keeps one index by request: its staleness is the point, not a slow refresher
                if (live.staleness(step) > cfg.refresh.max_staleness and warned_version != live.version
                        and cfg.refresh.every):
                    warned_version = live.version
                    print0(f"warning: step {step}: the index (v{live.version}) is {live.staleness(step)} steps "
                           f"stale (> refresh.max_staleness={cfg.refresh.max_staleness}); refreshers too slow?")
                    row.update(stale_warning=1)
                warm = step < cfg.train.reader_warmup_steps
                train_retriever = step >= cfg.train.reader_warmup_steps + cfg.train.retriever_freeze_steps
                full_batch = data.train_batch(step, cfg.train.batch_size, cfg.train.seed).to(self.device)
                losses = []
                for m in range(accum):
                    first = (m * group.size + group.rank) * micro  # the data of a step never depends on T
                    batch = batch_rows(full_batch, first, first + micro) if micro < cfg.train.batch_size else full_batch
                    out = stepper.module(batch, data, live, cfg.train.reader_warmup_k if warm else k, train_retriever,
                                         exclude_source=False if warm and cfg.train.warmup_allow_source else None,
                                         docs=batch.source[:, None] if warm and cfg.train.warmup_source_block
                                         else None)
                    loss = out.loss(per_doc=warm and cfg.train.warmup_loss == "per_doc")
                    if not math.isfinite(loss.item()):
                        raise TrainingError(f"loss is {loss.item()} at step {step} (lower optim.lr or check the data)")
                    stepper.micro_step(loss)
                    losses.append(loss.item())
                    if out.span_held is not None:
                        window_held.append(out.span_held.float().mean().item())
                step_loss = mean_over_trainers(sum(losses) / len(losses), group)
                state.step = step + 1
                staleness = live.staleness(state.step)
                state.max_staleness = max(state.max_staleness, staleness)
                state.staleness_sum += staleness
                window.append(step_loss)
                step_s = time.perf_counter() - t_step
                window_s += step_s
                state.realm_loop_s += step_s
                bar.set_postfix(loss=f"{step_loss:.3f}", v=live.version, stale=staleness)
                if state.step % cfg.train.log_every == 0:
                    # wait_s: seconds the loop spent on the index since the last row (mpi: ~0; inline: re-encodes)
                    row.update(loss=sum(window) / len(window), lr=stepper.lr(), wait_s=window_wait,
                               wait_share=window_wait / max(window_s, 1e-9))
                    if window_held:
                        row.update(span_held_share=sum(window_held) / len(window_held))
                    window, window_wait, window_s, window_held = [], 0.0, 0.0, []
                if state.step % cfg.train.eval_every == 0 and state.step < cfg.train.steps:  # the end: finish()
                    row.update(**_dev_recall_row(retrieval_metrics(model, data, live, k, split="dev")[0], k),
                               dev_mlm_acc=mlm_accuracy(model, data, live, k, split="dev",
                                                        batch_size=cfg.eval.batch_size))
                if row:
                    self.log.log(self._global_step(), phase="warmup" if warm else "realm", index_version=live.version,
                                 staleness=staleness, **row)
                signum = preempt.requested_by_any(group)
                if state.step < cfg.train.steps and (state.step % cfg.train.checkpoint_every == 0 or signum):
                    self.checkpoint(live, stepper)
                    if signum:
                        raise preempt.Preempted(signum, self._global_step())
        finally:
            refresher.close()
        self.checkpoint(live, stepper)
        return live

    # -- checkpoint, evaluation, summary ----------------------------------------------------------------------
    def checkpoint(self, live: LiveIndex | None, stepper) -> None:
        """Collective over the trainers: DeepSpeed shards first, then trainer 0 commits state.pt naming them."""
        self.state.wall_s += time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        st = self.state
        embeddings = None if live is None else full_embeddings(live)  # collective; a sharded index's: trainer 0's

        def state() -> dict:
            return {"model": self.model.state_dict(),
                    "run_state": {k: getattr(st, k) for k in RunState.__dataclass_fields__},
                    "data_position": st.step * self.cfg.train.batch_size,
                    "index": None if live is None else {"embeddings": embeddings, "version": live.snapshot.version,
                                                        "weights_step": live.snapshot.weights_step}}

        save_trainer_checkpoint(self.run_dir, self.group, stepper, f"step{st.step}", state)

    def finish(self, live: LiveIndex) -> dict:
        cfg, data, model, st = self.cfg, self.data, self.model, self.state
        k = cfg.retrieval.k
        # Evaluate the final encoder, not a stale one. A doc encoder that REALM never trained (warm-up and
        # train.retriever_freeze_steps cover the run, or train.freeze_doc_encoder) still has the weights the live
        # index was built from.
        never_trained = cfg.train.steps <= cfg.train.reader_warmup_steps + cfg.train.retriever_freeze_steps
        final = (live if never_trained or model.doc_frozen
                 else fresh_index(model, data, cfg, live.version + 1, st.step, self.group))
        # The run's second and last read of test; dev beside it closes the dev curves.
        recalls, reach = retrieval_metrics(model, data, final, k, split="test")
        recall = recalls[k]
        hits = mlm_token_hits(model, data, final, k, split="test", batch_size=cfg.eval.batch_size)
        mlm = share(hits)
        in_reach = per_token(data, reach, split="test")  # the test tokens whose span a final top-k doc holds
        dev_recalls, _ = retrieval_metrics(model, data, final, k, split="dev")
        dev_recall = dev_recalls[k]
        dev_mlm = mlm_accuracy(model, data, final, k, split="dev", batch_size=cfg.eval.batch_size)
        where = {"index_version": live.version} if final is live else {"fresh_index": 1}  # a fresh one is no version
        self.log.log(self._global_step(), phase="realm", test_recall_at_k=recall, test_mlm_acc=mlm,
                     **_dev_recall_row(dev_recalls, k), dev_mlm_acc=dev_mlm, **where)
        dev, test = data.heldout("dev"), data.heldout("test")
        summary = {
            "recipe": cfg.recipe, "steps": st.step, "corpus_docs": len(data.blocks), "k": k,
            f"dev_recall_at_{k}_start": st.dev_recall_start,
            f"dev_recall_at_{k}_after_ict": st.dev_recall_after_ict,
            f"dev_recall_at_{k}": dev_recall,
            "dev_mlm_acc_retrieval": dev_mlm,
            "dev_examples": len(dev),
            "dev_examples_with_gold": sum(bool(e.gold) for e in dev),
        }
        # The test split's numbers, "test_" prefixed in the summary: gold recall@1/k/20 of the start retriever,
        # the trained one and (eval.bm25_baseline) BM25 over the same documents, beside the rest.
        test_part = {
            **{f"recall_at_{j}_start": v for j, v in (st.test_recalls_start or {k: st.test_recall_start}).items()},
            **{f"recall_at_{j}": v for j, v in recalls.items()},
            **(self.bm25_recalls("test") if cfg.eval.bm25_baseline else {}),
            f"chance_recall_at_{k}": data.chance_recall(k, "test"),
            f"span_in_top_{k}_start": st.test_span_in_top_k_start,
            f"span_in_top_{k}": share(reach),
            "mlm_acc_retrieval": mlm,
            f"mlm_acc_retrieval_span_in_top_{k}": share(hits[in_reach]),
            f"mlm_acc_retrieval_span_not_in_top_{k}": share(hits[~in_reach]),
            "examples": len(test),
            "examples_with_gold": sum(bool(e.gold) for e in test),  # those recall@k is measured on
        }
        summary.update({
            "ict_steps": st.ict_steps,
            "index_versions": st.index_versions,
            "max_staleness_steps": st.max_staleness,
            "mean_staleness_steps": st.staleness_sum / max(st.step, 1),
            "trainer_wait_s": st.trainer_wait_s,
            "realm_steps_per_s": st.step / max(st.realm_loop_s, 1e-9),
            "realm_loop_s": st.realm_loop_s,
            "refresh_mode": cfg.refresh.mode,
        })
        if self.group.distributed:
            summary.update(trainers=self.group.size, index_sharded=cfg.index.sharded)
        if self.group.rank != 0:
            return {**summary, **{f"test_{key}": v for key, v in test_part.items()}}
        # Before summary.json, which marks a finished run: another run's span hits pair with these (realm-hpc bench
        # staleness compares refresh intervals with evaluate.paired_sign_test).
        spans = per_example(data, hits, split="test")
        atomic_write(self.run_dir / SPAN_HITS_FILE, lambda f: np.save(f, spans.numpy()))
        if cfg.eval.closed_book_baseline:
            cb_hits = self.closed_book_baseline()
            cb_spans = per_example(data, cb_hits, split="test")
            # Same held-out spans for both: the paired counts and McNemar's exact p say whether the gap is noise.
            # Paired per span (right = all its tokens right): a span's tokens are not independent trials.
            only_r, only_cb, p = paired_sign_test(spans, cb_spans)
            test_part.update({"mlm_acc_closed_book": share(cb_hits),
                              f"mlm_acc_closed_book_span_in_top_{k}": share(cb_hits[in_reach]),
                              f"mlm_acc_closed_book_span_not_in_top_{k}": share(cb_hits[~in_reach]),
                              "mlm_eval_tokens": len(hits), f"mlm_tokens_span_in_top_{k}": int(in_reach.sum()),
                              "mlm_eval_spans": len(spans), "mlm_span_acc_retrieval": share(spans),
                              "mlm_span_acc_closed_book": share(cb_spans),
                              "mlm_spans_only_retrieval_right": only_r, "mlm_spans_only_closed_book_right": only_cb,
                              "mlm_vs_closed_book_p_paired_spans": p})
        summary.update({f"test_{key}": v for key, v in test_part.items()})
        summary["wall_s"] = st.wall_s + time.perf_counter() - self.t0
        summary["trainer_wait_share"] = st.trainer_wait_s / summary["wall_s"]
        atomic_write_json(self.run_dir / "summary.json", summary)
        plot_curves(self.run_dir)
        return summary

    def bm25_recalls(self, split: str) -> dict[str, float]:
        """Gold recall@1/k/20 of BM25 over the run's documents on a held-out split (evaluate.bm25_retrieved: the
        masked span cut out of the query, the source excluded): the lexical baseline of the same run."""
        ks = recall_ks(self.cfg.retrieval.k)
        retrieved = bm25_retrieved(self.data, min(max(ks), len(self.data.blocks) - 1), split=split)
        return {f"bm25_recall_at_{j}": v for j, v in gold_recalls(retrieved, ks).items()}

    def closed_book_baseline(self) -> torch.Tensor:
        """The same reader, budget and data with retrieval off: it sees only the null document. Its hits on the
        test split's masked tokens (evaluate.mlm_token_hits), read once, at the end."""
        cfg = self.cfg
        cb_cfg = replace(cfg, retrieval=replace(cfg.retrieval, enabled=False))
        torch.manual_seed(cfg.train.seed)
        model = Realm(cb_cfg, self.data.vocab_size).to(self.device)
        opt, sched = build_optimizer(model, cb_cfg, 0.0)
        for step in tqdm(range(cfg.train.steps), desc="closed-book", leave=False):
            batch = self.data.train_batch(step, cfg.train.batch_size, cfg.train.seed).to(self.device)
            loss = model(batch, self.data, None, 0, train_retriever=False).loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
        return mlm_token_hits(model, self.data, None, 0, split="test", batch_size=cfg.eval.batch_size)


def _dev_recall_row(recalls: dict[int, float], k: int) -> dict[str, float]:
    """A metrics row's dev recall: dev_recall_at_k (the curves' key since the first runs) and the other depths."""
    return {"dev_recall_at_k": recalls[k], **{f"dev_recall_at_{j}": v for j, v in recalls.items() if j != k}}


def evaluate_run(run_dir: str | Path) -> dict:
    """`realm-hpc evaluate --run DIR`: recall@k, the share of masked spans a top-k doc holds and MLM accuracy of a
    pretraining run's checkpoint on its test and dev splits (evaluate.heldout_metrics, keyed as in summary.json), on
    a fresh index of its doc encoder; written to DIR/eval.json."""
    from realm_hpc.device import trainer_device
    from realm_hpc.runs import load_run

    cfg, data, model = load_run(run_dir)
    model.to(trainer_device(cfg.train.device))  # where the run evaluated itself: the numbers of its summary
    index = fresh_index(model, data, cfg, 0, 0)
    result = heldout_metrics(model, data, index, cfg.retrieval.k, cfg.eval.batch_size)
    atomic_write_json(Path(run_dir) / "eval.json", result)
    return result
