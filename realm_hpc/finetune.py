"""Open-QA fine-tuning and evaluation (REALM §3.4): retrieve the top-k blocks for a question from an index that
stays fixed, read every candidate answer span of each, and maximise the probability of the gold answer summed over
the retrieved blocks and over every span that matches it.

As in REALM and ORQA, the document encoder and its index are frozen (built once from the pretrained doc encoder);
the query encoder and the span reader (initialised from the pretrained reader's BERT body) are trained.
The closed-book baseline is the pretrained MLM reader fine-tuned with the same steps, batch and learning rate to
fill `[CLS] q [SEP] [MASK]*5 [SEP]` with the answer's tokens and an end marker: a reader that has no documents.
(The span reader alone on `[CLS] q [SEP]` could only ever point into the question, i.e. score 0 by construction.)

Several trainers (mpiexec / torchrun) train the QA model data-parallel in a DeepSpeed engine, each on its rows of
every step's global batch, as pretraining does; trainer 0 alone builds the index, evaluates and writes the files.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import kernels
from realm_hpc import preempt
from realm_hpc.checkpoint import (atomic_write_json, load_checkpoint, load_weights, save_checkpoint,
                                  save_trainer_checkpoint, set_trainer_rng_state)
from realm_hpc.config import Config, ConfigError, load_config
from realm_hpc.data.blocks import BlockStore
from realm_hpc.data.corpus import atomic_file, read_corpus
from realm_hpc.data.qa import (QAExample, exact_match, has_answer, normalize_answer, read_qa, world_questions,
                               write_qa_jsonl)
from realm_hpc.data.qa_inputs import QAInputs
from realm_hpc.data.tokenizer import load_tokenizer
from realm_hpc.device import group_device, trainer_device
from realm_hpc.dist import TrainerGroup, barrier, mean_over_trainers, print0, sum_over_trainers
from realm_hpc.metrics import MetricsLogger
from realm_hpc.models.encoders import Encoder, Retriever
from realm_hpc.models.reader import Reader
from realm_hpc.models.span_reader import SpanReader, qa_marginal_loss, span_log_softmax
from realm_hpc.optim import check_step_plan, make_stepper, micro_batch_size, step_plan, warmup_schedule
from realm_hpc.runs import load_run


class QAModel(nn.Module):
    """The trained half of Open-QA: the query encoder f(q) and the span reader."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        m = cfg.model
        self.query = Encoder(m, vocab_size, max(m.query_len, m.block_len))
        self.reader = SpanReader(m, vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def retriever(self) -> Encoder:
        """The trained retriever side (the doc encoder stays outside, fixed): the optimizer's retriever group."""
        return self.query

    def forward(self, inputs: QAInputs, questions: list[str], answers: list[set[str]], index: torch.Tensor, k: int):
        """Retrieve, then read: (retrieval scores [B, K], span log-probs [B, K, S], reader batch)."""
        enc = inputs.questions(questions)
        scores, ids = self.retrieve(enc, index, k)
        span_logp, rb = self.read(inputs, inputs.question_tokens(enc), ids, answers)
        return scores, span_logp, rb

    def retrieve(self, enc: dict, index: torch.Tensor, k: int):
        """Top-k block ids from the fixed index, and their scores f(q)·g(z) with gradients to f."""
        device = self.device
        q = self.query(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        _, ids = kernels.ip_topk(q.detach(), index, k)
        return torch.einsum("bp,bkp->bk", q, index[ids].to(q.dtype)), ids

    def read(self, inputs: QAInputs, q_tokens, ids: torch.Tensor, answers: list[set[str]]):
        """Span log-probs [B, K, S] per block, the reader batch (for matches and decoding)."""
        rb = inputs.reader_batch(q_tokens, ids, answers).to(self.device)
        scores = self.reader(rb.input_ids, rb.attention_mask, rb.token_type_ids, rb.starts, rb.ends, rb.valid)
        B, K = ids.shape
        return span_log_softmax(scores, rb.valid).view(B, K, -1), rb


@dataclass
class QAContext:
    """What the fine-tune and `evaluate --qa` share: the pretrained run's tokenizer and blocks, the fixed index."""
    cfg: Config
    inputs: QAInputs
    index: torch.Tensor  # [N, P] float32 g(z), fixed
    vocab_size: int


def _retrieval_data(cfg: Config, run_dir: Path) -> tuple:
    """The pretrained run's tokenizer, and the blocks the fine-tune retrieves from: the pretraining corpus, or the
    `qa.corpus` a fine-tune swapped in (tokenized into run_dir/data/blocks)."""
    pre = Path(cfg.qa.pretrained)
    tokenizer = load_tokenizer(cfg.model.pretrained or pre / "data" / "tokenizer")
    blocks_dir = run_dir / "data" / "blocks" if cfg.qa.corpus else pre / "data" / "blocks"
    return tokenizer, BlockStore.open(blocks_dir)


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng((seed, 3, epoch)).permutation(n)


def _batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The examples of a step: a function of (seed, step) alone, so a resumed run sees the same batches."""
    return [int(_epoch_order(n, seed, c // n)[c % n]) for c in range(step * batch_size, (step + 1) * batch_size)]


# -- evaluation ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_open_book(model: QAModel, ctx: QAContext, examples: list[QAExample], batch_size: int = 16):
    """Prediction = argmax over the top-k blocks' spans of log p(z|q) + log p(span|z,q), as the passage's own
    characters. Returns (rows, metrics): normalised exact match, and recall@k by DPR's rule (a top-k block's text
    contains a gold answer's tokens, `data.qa.has_answer`)."""
    was = model.training
    model.eval()
    k, rows = ctx.cfg.qa.k, []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        enc = ctx.inputs.questions([e.question for e in chunk])
        gold = [{normalize_answer(a) for a in e.answers} for e in chunk]
        scores, ids = model.retrieve(enc, ctx.index, k)
        span_logp, rb = model.read(ctx.inputs, ctx.inputs.question_tokens(enc), ids, gold)
        joint = torch.log_softmax(scores.float(), dim=1).unsqueeze(-1) + span_logp  # [B, K, S]
        best = joint.flatten(1).argmax(dim=1)
        S = span_logp.size(-1)
        for b, e in enumerate(chunk):
            kk, s = divmod(int(best[b]), S)
            block = int(ids[b, kk])
            if torch.isfinite(joint[b, kk, s]):
                a, z = rb.span_tokens[b * k + kk][s]
                prediction = ctx.inputs.span_text(block, a, z)
            else:  # no candidate span in any retrieved block
                prediction = ""
            hit = any(has_answer(ctx.inputs.blocks.text(d), e.answers) for d in ids[b].tolist())
            rows.append({"question": e.question, "answers": list(e.answers), "prediction": prediction,
                         "em": exact_match(prediction, e.answers), "answer_in_top_k": hit,
                         "doc_ids": [ctx.inputs.blocks.doc_id(i) for i in ids[b].tolist()],
                         "retrieval_scores": [round(float(x), 4) for x in scores[b]]})
    model.train(was)
    return rows, _metrics(rows, k)


@torch.no_grad()
def evaluate_closed_book(reader: Reader, ctx: QAContext, examples: list[QAExample], batch_size: int = 32):
    was = reader.training
    reader.eval()
    rows = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        q_tokens = ctx.inputs.question_tokens(ctx.inputs.questions([e.question for e in chunk]))
        device = next(reader.parameters()).device
        inp = {name: t.to(device) for name, t in ctx.inputs.closed_book_batch(q_tokens).items()}
        logp = reader.token_logprobs(inp["input_ids"], inp["attention_mask"], inp["token_type_ids"],
                                     inp["positions"], inp["doc_mask"])
        for e, predicted in zip(chunk, logp.argmax(-1).tolist()):
            prediction = ctx.inputs.closed_book_answer(predicted)
            rows.append({"question": e.question, "answers": list(e.answers), "prediction": prediction,
                         "em": exact_match(prediction, e.answers)})
    reader.train(was)
    return rows, _metrics(rows, None)


def _metrics(rows: list[dict], k: int | None) -> dict:
    n = len(rows)
    out = {"em": sum(r["em"] for r in rows) / n if n else float("nan"), "questions": n}
    if k is not None:
        out[f"recall_at_{k}"] = sum(r["answer_in_top_k"] for r in rows) / n if n else float("nan")
    return out


def write_predictions(rows: list[dict], path: Path) -> Path:
    with atomic_file(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# -- fine-tuning -------------------------------------------------------------------------------------------------
def _trainer_loss(loss: torch.Tensor, log_marginal: torch.Tensor, used: torch.Tensor,
                  group: TrainerGroup) -> torch.Tensor:
    """This trainer's share of the step loss: the mean over the questions of the whole global batch that have a
    matching span (`qa_marginal_loss` on all rows), scaled so that the trainers' average (what DeepSpeed's
    gradient all-reduce and `mean_over_trainers` take) is that mean, whatever the trainer count."""
    if not group.distributed:
        return loss
    n_used = sum_over_trainers(float(used.sum()), group)
    if not used.any():
        return loss  # the zero-gradient graph: the other trainers' questions carry the step
    return -log_marginal[used].sum() * (group.size / n_used)


class Finetuner:
    """One trainer's fine-tune. With several trainers (`group`) every trainer runs this code in lockstep: the steps
    are data-parallel, trainer 0 alone writes the run's files and evaluates (the others need no evaluation)."""

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False, group: TrainerGroup = TrainerGroup()):
        self.cfg, self.out, self.resume, self.group = cfg, Path(out), resume, group
        self.device = group_device(group, cfg.train.device)
        if not cfg.qa.pretrained:
            raise ConfigError("qa.pretrained: the pretraining run to start from is not set (--pretrained RUN_DIR)")
        if not (Path(cfg.qa.pretrained) / "checkpoint").exists():
            raise FileNotFoundError(f"{Path(cfg.qa.pretrained) / 'checkpoint'}: no pretrained checkpoint")
        pre = load_config(str(Path(cfg.qa.pretrained) / "config.json")).to_dict()
        changed = [f"{section}.{key}" for section in ("model", "data") for key, value in cfg.to_dict()[section].items()
                   if pre[section][key] != value]
        if changed:
            raise ConfigError(f"{', '.join(changed)}: a fine-tune keeps the pretrained run's model and data settings")
        check_step_plan(step_plan(cfg, "qa"), group.size)  # a batch the trainers cannot split stops here, not later

    def run(self) -> dict:
        cfg, out = self.cfg, self.out
        t0 = time.perf_counter()
        splits = self._questions()  # first: a malformed QA file stops the run before any encoding
        torch.manual_seed(cfg.qa.seed)
        pre_model, vocab_size = self._pretrained_model()
        pre_model.to(self.device)  # its doc encoder builds the index, its reader is the closed-book baseline
        ctx = self.ctx = self._context(pre_model, vocab_size)
        model = QAModel(cfg, vocab_size).to(self.device)  # initialised on the CPU: the same weights on any device
        print0(f"fine-tuning on {self.device} ({self.group.size} trainer(s), train.device={cfg.train.device})")
        model.query.load_state_dict(pre_model.retriever.query.state_dict())
        model.reader.bert.load_state_dict(pre_model.reader.mlm.bert.state_dict())
        usable = self._usable_questions(model, splits["train"])
        summary = {"recipe": cfg.recipe, "pretrained": cfg.qa.pretrained, "retriever_init": cfg.qa.retriever_init,
                   "k": cfg.qa.k, "steps": cfg.qa.steps, "corpus_docs": len(ctx.inputs.blocks),
                   **{f"{s}_questions": len(v) for s, v in splits.items()}, "train_questions_usable": usable}
        with MetricsLogger(out, enabled=self.group.rank == 0, resume_step=self._resume_step()) as log:
            self.train(model, splits, log)
            if self.group.rank != 0:
                return summary
            for split in ("dev", "test"):
                if splits.get(split):
                    rows, m = evaluate_open_book(model, ctx, splits[split])
                    write_predictions(rows, out / "eval" / f"{split}.predictions.jsonl")
                    summary.update({f"{split}_{key}": v for key, v in m.items() if key != "questions"})
            if cfg.qa.closed_book_baseline:
                reader = self.train_closed_book(pre_model, splits["train"])
                for split in ("dev", "test"):
                    if splits.get(split):
                        rows, m = evaluate_closed_book(reader, ctx, splits[split])
                        write_predictions(rows, out / "eval" / f"{split}.closed_book.predictions.jsonl")
                        summary[f"{split}_em_closed_book"] = m["em"]
        summary["wall_s"] = time.perf_counter() - t0
        if self.group.distributed:
            summary["trainers"] = self.group.size
        atomic_write_json(out / "summary.json", summary)
        return summary

    # -- set-up ----------------------------------------------------------------------------------------------------
    def _pretrained_model(self):
        _, data, model = load_run(self.cfg.qa.pretrained)
        self.pre_data = data
        if self.cfg.qa.retriever_init == "random":  # the ablation: REALM pretraining never touched this retriever
            torch.manual_seed(self.cfg.qa.seed)
            model.retriever = Retriever(self.cfg.model, data.vocab_size)
        return model, data.vocab_size

    def _context(self, pre_model, vocab_size: int) -> QAContext:
        """The fixed index (built by trainer 0, once; the others wait for it) and the inputs that read it."""
        from realm_hpc.retrieval.store import SavedIndex

        if self.group.rank == 0:
            self._build_index(pre_model)
        barrier(self.group)
        cfg = self.cfg
        tokenizer, blocks = _retrieval_data(cfg, self.out)
        if cfg.qa.k > len(blocks):
            raise ConfigError(f"qa.k={cfg.qa.k} is more than the {len(blocks)} documents of "
                              f"{cfg.qa.corpus or 'the pretrained run'} to retrieve from")
        emb = SavedIndex.open(self.out / "index").embeddings().float().to(self.device)
        inputs = QAInputs(tokenizer, blocks, cfg.model.reader_len, cfg.model.query_len, cfg.qa.max_span_len)
        return QAContext(cfg, inputs, emb, vocab_size)

    def _build_index(self, pre_model) -> None:
        from realm_hpc.retrieval.store import build_index

        cfg, index_dir = self.cfg, self.out / "index"
        if self.resume and (index_dir / "meta.json").exists():
            return
        docs = read_corpus(cfg.qa.corpus) if cfg.qa.corpus else self.pre_data.docs
        if cfg.qa.corpus:  # a swapped corpus, tokenized with the pretrained run's tokenizer
            BlockStore.build(docs, self.pre_data.tokenizer, self.out / "data" / "blocks", max_len=cfg.model.block_len)
        tokenizer, blocks = _retrieval_data(cfg, self.out)
        # once: the doc encoder stays fixed; the texts let `evaluate --qa --index DIR/index` check answers
        build_index(pre_model, blocks, tokenizer, cfg, index_dir, texts=[d.text for d in docs])

    def _questions(self) -> dict[str, list[QAExample]]:
        qa = self.cfg.qa
        if qa.train:
            return {s: read_qa(p) for s, p in (("train", qa.train), ("dev", qa.dev), ("test", qa.test)) if p}
        if self.cfg.data.corpus:
            raise ConfigError("qa.train: set the QA files; questions are generated only for the embedded fact world")
        from realm_hpc.data.world import build_world

        d = self.cfg.data
        world = build_world(people=d.world_people, orgs=d.world_orgs, cities=d.world_cities, surnames=d.world_surnames,
                            alias_rate=d.world_alias_rate, heldout_facts=d.heldout_facts, seed=d.world_seed)
        splits = world_questions(world, qa.dev_fraction, qa.test_fraction, qa.seed, qa.phrasings_per_fact)
        # Written first (by trainer 0) and read back, so the files on disk are exactly what the run used.
        if self.group.rank == 0:
            for s, v in splits.items():
                write_qa_jsonl(v, self.out / "qa" / f"{s}.jsonl")
        barrier(self.group)
        return {s: read_qa(self.out / "qa" / f"{s}.jsonl") for s in splits}

    def _usable_questions(self, model: QAModel, train: list[QAExample]) -> int:
        """How many training questions have a span matching a gold answer in their top-k blocks at the start (the
        loss skips the others). None at all would 'train' with loss 0 and report success: refused instead."""
        qa = self.cfg.qa
        if not train:
            raise ConfigError(f"qa.train: no training questions in {qa.train or 'the generated split'}")
        usable = 0
        was = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(train), 64):
                chunk = train[start:start + 64]
                _, ids = model.retrieve(self.ctx.inputs.questions([e.question for e in chunk]), self.ctx.index, qa.k)
                usable += sum(any(self.ctx.inputs.contains_answer(d, {normalize_answer(a) for a in e.answers})
                                  for d in row) for e, row in zip(chunk, ids.tolist()))
        model.train(was)
        where = f"top-{qa.k} retrieved blocks (qa.k)"
        if usable == 0:
            raise ConfigError(f"qa.train: none of the {len(train)} training questions has a gold answer span in its "
                              f"{where}: the fine-tune would train on nothing; check the answers against the corpus "
                              "or raise qa.k")
        print0(f"{usable} of {len(train)} training questions have a gold answer span in their {where} at the start; "
               "the others add nothing to the loss")
        return usable

    def _resume_step(self) -> int | None:
        if self.resume and (self.out / "checkpoint").exists():
            return int(load_checkpoint(self.out / "checkpoint")["step"])
        return -1 if self.resume else None  # stopped before its first checkpoint: it starts over, drop its rows

    # -- the open-book loop ----------------------------------------------------------------------------------
    def train(self, model: QAModel, splits: dict, log: MetricsLogger) -> None:
        cfg, ctx, qa, group = self.cfg, self.ctx, self.cfg.qa, self.group
        train = splits["train"]
        ckpt = load_checkpoint(self.out / "checkpoint") if self.resume and (self.out / "checkpoint").exists() else None
        if ckpt is not None:
            # before the stepper: DeepSpeed copies the weights it starts from
            load_weights(model, ckpt["model"], self.out / "checkpoint")
        plan = step_plan(cfg, "qa")
        stepper = make_stepper(model, plan, qa.lr * qa.retriever_lr_scale, group.size)
        micro = micro_batch_size(plan, group.size)
        start = 0
        if ckpt is not None:
            stepper.load(ckpt, self.out)
            set_trainer_rng_state(ckpt, group)
            start = int(ckpt["step"])
            print0(f"resuming the fine-tune at step {start}")
        dev = splits.get("dev", [])[: qa.eval_examples or None] if group.rank == 0 else []
        model.train()
        window: list[tuple[float, float]] = []
        bar = tqdm(range(start, qa.steps), desc="finetune", leave=False, initial=start, total=qa.steps,
                   disable=group.rank != 0)
        for step in bar:
            rows = _batch_indices(len(train), step, qa.batch_size, qa.seed)
            first = group.rank * micro  # this trainer's rows: the data of a step never depends on the trainer count
            chunk = [train[i] for i in rows[first:first + micro]]
            gold = [{normalize_answer(a) for a in e.answers} for e in chunk]
            scores, span_logp, rb = stepper.module(ctx.inputs, [e.question for e in chunk], gold, ctx.index, qa.k)
            loss, log_marginal, used = qa_marginal_loss(scores.float(), span_logp, rb.match.view(span_logp.shape))
            loss = _trainer_loss(loss, log_marginal, used, group)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"fine-tune loss is {loss.item()} at step {step} (lower qa.lr)")
            stepper.micro_step(loss)
            step_loss = mean_over_trainers(loss.item(), group)
            window.append((step_loss, mean_over_trainers(used.float().mean().item(), group)))
            bar.set_postfix(loss=f"{step_loss:.3f}")
            done = step + 1
            row = {}
            if done % qa.log_every == 0:
                row.update(loss=sum(w[0] for w in window) / len(window), answerable=sum(w[1] for w in window) /
                           len(window), lr=stepper.lr())
                window = []
            if dev and (done % qa.eval_every == 0 or done == qa.steps):
                _, m = evaluate_open_book(model, ctx, dev)
                row.update(dev_em=m["em"], **{f"dev_{key}": v for key, v in m.items() if key.startswith("recall")})
            if row:
                log.log(done, phase="finetune", **row)
            signum = preempt.requested_by_any(group)  # SIGUSR1/SIGTERM: checkpoint now, exit 75 (slurm requeues)
            if done % qa.checkpoint_every == 0 or done == qa.steps or signum:
                save_trainer_checkpoint(self.out, group, stepper, f"step{done}",
                                        lambda: {"model": model.state_dict(), "step": done})
                if signum and done < qa.steps:
                    raise preempt.Preempted(signum, done)

    # -- the closed-book baseline ---------------------------------------------------------------------------------
    def train_closed_book(self, pre_model, train: list[QAExample]) -> Reader:
        """The pretrained MLM reader, no documents, the same steps/batch/lr: fills [MASK]*m with the answer."""
        cfg, ctx, qa = self.cfg, self.ctx, self.cfg.qa
        reader = pre_model.reader
        ckpt_dir = self.out / "closed_book"
        if self.resume and ckpt_dir.exists():
            load_weights(reader, load_checkpoint(ckpt_dir)["model"], ckpt_dir)
            return reader
        torch.manual_seed(qa.seed)
        opt = torch.optim.AdamW([{"params": list(reader.parameters()), "lr": qa.lr}],
                                weight_decay=cfg.optim.weight_decay)
        sched = warmup_schedule(opt, step_plan(cfg, "qa"))
        reader.train()
        for step in tqdm(range(qa.steps), desc="closed-book", leave=False):
            chunk = [train[i] for i in _batch_indices(len(train), step, qa.batch_size, qa.seed)]
            q_tokens = ctx.inputs.question_tokens(ctx.inputs.questions([e.question for e in chunk]))
            inp = {name: t.to(self.device)
                   for name, t in ctx.inputs.closed_book_batch(q_tokens, [e.answers[0] for e in chunk]).items()}
            logp = reader.target_logprob(inp["input_ids"], inp["attention_mask"], inp["token_type_ids"],
                                         inp["positions"], inp["targets"], inp["target_mask"], inp["doc_mask"])
            loss = -logp.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reader.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
        save_checkpoint(ckpt_dir, {"model": reader.state_dict(), "step": qa.steps})
        return reader


# -- evaluate --qa ---------------------------------------------------------------------------------------------------
def evaluate_run(run_dir: str | Path, qa_file: str | Path) -> dict:
    """`realm-hpc evaluate --qa FILE --run DIR`: a fine-tuned run on any QA file; the closed-book reader beside it
    when the run trained one. Writes DIR/eval/<name>.predictions.jsonl (+ .closed_book) and DIR/eval/<name>.json."""
    run_dir = Path(run_dir)
    cfg = load_config(str(run_dir / "config.json"))
    if not cfg.qa.pretrained or not (run_dir / "index" / "meta.json").exists():
        raise FileNotFoundError(f"{run_dir}: not a fine-tune run (no qa.pretrained in config.json or no index/)")
    from realm_hpc.retrieval.store import SavedIndex

    tokenizer, blocks = _retrieval_data(cfg, run_dir)
    vocab = len(tokenizer)
    m = cfg.model
    inputs = QAInputs(tokenizer, blocks, m.reader_len, m.query_len, cfg.qa.max_span_len)
    device = trainer_device(cfg.train.device)  # where the fine-tune evaluated itself: the numbers of its summary
    emb = SavedIndex.open(run_dir / "index").embeddings().float().to(device)
    ctx = QAContext(cfg, inputs, emb, vocab)
    model = QAModel(cfg, vocab).to(device)
    load_weights(model, load_checkpoint(run_dir / "checkpoint")["model"], run_dir / "checkpoint")
    examples = read_qa(qa_file)
    name = Path(qa_file).name.split(".")[0]
    rows, metrics = evaluate_open_book(model, ctx, examples)
    write_predictions(rows, run_dir / "eval" / f"{name}.predictions.jsonl")
    result = {"qa_file": str(qa_file), "k": cfg.qa.k, **metrics}
    if (run_dir / "closed_book").exists():
        reader = Reader(cfg.model, vocab).to(device)
        load_weights(reader, load_checkpoint(run_dir / "closed_book")["model"], run_dir / "closed_book")
        cb_rows, cb = evaluate_closed_book(reader, ctx, examples)
        write_predictions(cb_rows, run_dir / "eval" / f"{name}.closed_book.predictions.jsonl")
        result["em_closed_book"] = cb["em"]
    atomic_write_json(run_dir / "eval" / f"{name}.json", result)
    return result
