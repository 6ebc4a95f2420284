"""Index refresh: the blocking inline baseline, and refresher ranks that re-encode the corpus asynchronously.

The MPI protocol, all of it (so more trainers or refreshers is a change of counts, not of code):
- trainer 0 -> each refresher: TAG_READY once (the run directory); the refresher answers TAG_READY once its encoder
  is built. Then per refresh TAG_HEADER
  [version, weights_step, n_floats] and TAG_WEIGHTS (the doc encoder's flat float32 parameters), finally
  TAG_STOP;
- each refresher -> trainer 0: TAG_STATS [version, encode_s, first row, end row] and TAG_EMBEDDINGS, its
  shard's rows (shard = the refresher's slice of the corpus by arithmetic).
Trainer 0 talks MPI only from a background thread that polls with short sleeps: mpich's blocking calls spin a
core, and a large message only moves while both sides call into MPI. The training loop just takes a finished
index from a slot between steps (double buffer), so it never waits on a refresh.
With several trainers, trainer 0 alone talks to the refreshers; `TrainerBroadcastRefresher` makes every trainer
swap the same version at the same step (trainer 0 decides and broadcasts over torch.distributed; a sharded index
gets each trainer only its rows).
Refreshers that stop answering (`refresh.timeout_s`) are replaced, where the launcher allows it, by processes the
trainers start together (`RefresherSpawner`: MPI_Comm_spawn over their own communicator); the protocol then runs
over the inter-communicator, whose remote ranks 0..M-1 are the new refreshers.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from realm_hpc.retrieval.index import IndexSnapshot, LiveIndex, encode_blocks, shard_range
from realm_hpc.retrieval.sharded import build_index, swap_from_trainer0

TAG_READY, TAG_HEADER, TAG_WEIGHTS, TAG_STOP, TAG_STATS, TAG_EMBEDDINGS = 10, 11, 12, 13, 14, 15
_POLL_S = 0.002
# A refresher is allowed this much longer than refresh.timeout_s for its first answer (TAG_READY): a process spawned
# to replace a lost one imports torch and builds its encoder first.
STARTUP_S = 120.0


def flatten_params(module: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().float().reshape(-1) for p in module.state_dict().values()]).cpu().numpy()


def load_flat_params(module: torch.nn.Module, flat: np.ndarray) -> None:
    state, offset = module.state_dict(), 0
    for name, t in state.items():
        n = t.numel()
        t.copy_(torch.from_numpy(flat[offset:offset + n]).view_as(t).to(t.dtype))
        offset += n
    if offset != flat.size:
        raise ValueError(f"weights message has {flat.size} floats, the doc encoder needs {offset}")


class _Abandoned(Exception):
    """The refreshers this comm thread waits on were given up for lost."""


def _wait(request, abandon: threading.Event | None = None) -> None:
    while not request.Test():
        if abandon is not None and abandon.is_set():
            raise _Abandoned
        time.sleep(_POLL_S)


@dataclass
class RefreshEvent:
    """What happened at one step boundary."""
    swapped: bool = False
    sent: bool = False
    wait_s: float = 0.0  # time the training loop spent here
    encode_s: float = 0.0  # time to re-encode (inline: blocking; mpi: on the refreshers)
    docs_per_s: float = 0.0
    shards: list | None = None  # mpi: per refresher [first row, end row, docs/s] of the version swapped in
    lost: bool = False  # mpi: the refreshers stopped answering at this boundary
    respawned: int = 0  # mpi: replacement refreshers started at this boundary (0: none, the index stays stale)


class InlineRefresher:
    """The blocking baseline (and the trainers-only debug path): re-encode every `every` steps (0: never), in the
    loop.

    With several trainers (`group`) each encodes its slice of the corpus; `build_index` gathers them or, for a
    sharded index, keeps them where they are.
    """

    def __init__(self, blocks, every: int, batch_size: int, group=None, sharded: bool = False):
        self.blocks, self.every, self.batch_size = blocks, every, batch_size
        self.group, self.sharded = group, sharded

    def step_boundary(self, step: int, doc_encoder: torch.nn.Module, live: LiveIndex) -> RefreshEvent:
        if self.every <= 0 or step == 0 or step % self.every:
            return RefreshEvent()
        t0 = time.perf_counter()
        if self.group is not None and self.group.distributed:
            snapshot = build_index(doc_encoder, self.blocks, self.batch_size, live.version + 1, step, self.group,
                                   self.sharded, dtype=live.dtype).snapshot
        else:
            snapshot = IndexSnapshot(encode_blocks(doc_encoder, self.blocks, self.batch_size), live.version + 1, step)
        live.swap(snapshot)
        spent = time.perf_counter() - t0
        return RefreshEvent(swapped=True, sent=True, wait_s=spent, encode_s=spent, docs_per_s=len(self.blocks) / spent)

    def close(self) -> None:
        pass


class MPIRefresher:
    """Trainer 0's side: hands weight snapshots to the refresher ranks and collects the new index."""

    def __init__(self, comm, refreshers: list[int], n_docs: int, dim: int, every: int, run_dir: str,
                 timeout_s: float = 0.0, spawner: RefresherSpawner | None = None):
        self.n_docs, self.dim, self.every, self.run_dir = n_docs, dim, every, str(run_dir)
        # mpich reports no error for a dead rank: a refresh in flight for longer than this means it is gone (an
        # MPI that reports it, e.g. Open MPI with ULFM, has the comm thread set `_failed` at once).
        self.timeout_s, self.lost, self._sent_at = timeout_s, False, 0.0
        self._orphans: list = []  # requests (and their buffers) still pending on abandoned refreshers: kept alive
        self.spawner = spawner  # None: a lost refresher is not replaced
        self.losses = 0  # > 0: a rank died, MPI_Finalize would hang (the caller leaves with os._exit)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.last_sent = None
        self._connect(comm, refreshers)

    def _connect(self, comm, refreshers) -> None:
        """Start talking to a set of refreshers (the launch's ranks, or spawned ones over an inter-communicator)."""
        self.comm, self.refreshers = comm, list(refreshers)
        self._todo: queue.Queue = queue.Queue()
        self._abandon = threading.Event()
        self._failed = threading.Event()  # MPI raised an error on this set's messages (e.g. a dead rank)
        self._done: IndexSnapshot | None = None
        self._done_stats = np.zeros((len(self.refreshers), 4))
        self._busy = False
        self._ready_at: float | None = None  # when every refresher had built its encoder
        for r in self.refreshers:
            comm.send(self.run_dir, dest=r, tag=TAG_READY)
        self._thread = threading.Thread(target=self._serve,
                                        args=(comm, self.refreshers, self._todo, self._abandon, self._failed),
                                        name="refresh-comm", daemon=True)
        self._thread.start()

    def step_boundary(self, step: int, doc_encoder: torch.nn.Module, live: LiveIndex) -> RefreshEvent:
        t0 = time.perf_counter()
        event = RefreshEvent()
        done = self.take()
        if done is not None:
            live.swap(done)
            self.fill_event(event)
        event.lost = self.check_lost()
        if event.lost and self.spawner is not None:
            event.respawned = self.replace(self.spawner.spawn())
        event.sent = self.maybe_send(step, doc_encoder, live.version, live.snapshot.weights_step)
        event.wait_s = time.perf_counter() - t0
        return event

    def take(self) -> IndexSnapshot | None:
        """The finished next version, if one has landed (once)."""
        if self._error is not None:
            raise RuntimeError(f"index refresh failed: {self._error}")
        with self._lock:
            done, self._done = self._done, None
        if done is not None:
            self._busy = False
        return done

    def check_lost(self) -> bool:
        """True once per set of refreshers, at the first boundary where MPI has reported one of them dead, or where
        the refresh in flight is older than timeout_s (plus STARTUP_S while they have not answered TAG_READY). The
        trainers keep their last index (its staleness grows) and send nothing more, unless `replace` hands them new
        refreshers."""
        if self.lost:
            return False
        if self._failed.is_set():
            self.lost, self.losses = True, self.losses + 1
            return True
        if not self._busy or self.timeout_s <= 0:
            return False
        ready_at = self._ready_at
        limit = self.timeout_s + (0.0 if ready_at is not None else STARTUP_S)
        if time.perf_counter() - max(self._sent_at, ready_at or 0.0) > limit:
            self.lost, self.losses = True, self.losses + 1
            return True
        return False

    def replace(self, inter) -> int:
        """After a loss: go on with the refreshers spawned over the inter-communicator `inter` (None: no
        replacement, keep the last index). Returns how many took over."""
        if inter is None:
            return 0
        self.abandon_refreshers()
        self._connect(inter, range(inter.Get_remote_size()))
        self.lost = False
        return len(self.refreshers)

    def abandon_refreshers(self) -> None:
        """Give up on the current refreshers: the comm thread leaves its wait on the dead rank, survivors (if any)
        leave without MPI_Finalize (it would wait on the dead)."""
        from mpi4py import MPI

        self._abandon.set()
        for r in self.refreshers:
            try:
                self._orphans.append(self.comm.isend("lost", dest=r, tag=TAG_STOP))
            except MPI.Exception:
                pass

    def fill_event(self, event: RefreshEvent) -> None:
        """Stats of the version `take` returned: the slowest refresher's encode time, each refresher's shard."""
        event.swapped = True
        per = self._done_stats
        event.encode_s = float(per[:, 1].max())
        event.docs_per_s = self.n_docs / max(event.encode_s, 1e-9)
        event.shards = [[int(a), int(b), float((b - a) / max(t, 1e-9))] for _, t, a, b in per.tolist()]

    def maybe_send(self, step: int, doc_encoder: torch.nn.Module, version: int, weights_step: int) -> bool:
        # The first snapshot counts from the weights that built the live index, so v2 is never a re-encode of v1.
        last = self.last_sent if self.last_sent is not None else weights_step
        if self.lost or self._busy or self.every <= 0 or step - last < self.every:  # every=0: never refresh
            return False
        self._todo.put((version + 1, step, flatten_params(doc_encoder)))
        self._busy, self.last_sent, self._sent_at = True, step, time.perf_counter()
        return True

    def _serve(self, comm, refreshers: list[int], todo: queue.Queue, abandon: threading.Event,
               failed: threading.Event) -> None:
        pending: list = []  # what MPI may still touch: kept referenced if these refreshers are abandoned
        try:
            pending = [comm.irecv(source=r, tag=TAG_READY) for r in refreshers]
            for req in pending:
                _wait(req, abandon)
            self._ready_at = time.perf_counter()
            while True:
                item = todo.get()
                if item is None:
                    for r in refreshers:
                        _wait(comm.isend(None, dest=r, tag=TAG_STOP), abandon)
                    return
                version, step, flat = item
                header = np.asarray([version, step, flat.size], dtype=np.int64)
                sends = []
                for r in refreshers:
                    sends += [comm.Isend(header, dest=r, tag=TAG_HEADER), comm.Isend(flat, dest=r, tag=TAG_WEIGHTS)]
                back = np.empty((self.n_docs, self.dim), dtype=np.float32)  # the back buffer of version v+1
                stats = np.zeros((len(refreshers), 4), dtype=np.float64)
                recvs = []
                for i, r in enumerate(refreshers):
                    rows = shard_range(self.n_docs, len(refreshers), i)
                    recvs += [comm.Irecv(stats[i], source=r, tag=TAG_STATS),
                              comm.Irecv(back[rows.start:rows.stop], source=r, tag=TAG_EMBEDDINGS)]
                pending = [sends, recvs, header, flat, back, stats]
                for req in sends + recvs:
                    _wait(req, abandon)
                with self._lock:
                    if not abandon.is_set():
                        self._done = IndexSnapshot(torch.from_numpy(back), version, step)
                        self._done_stats = stats
        except _Abandoned:
            self._orphans.append(pending)
        except BaseException as e:
            from mpi4py import MPI

            if isinstance(e, MPI.Exception):  # these refreshers cannot be talked to: the next boundary drops them
                print(f"warning: MPI error talking to the refreshers ({e.Get_error_string()}); treating them as lost",
                      file=sys.stderr, flush=True)
                self._orphans.append(pending)
                failed.set()
            else:  # surfaced to the training loop at the next step boundary
                self._error = e

    def close(self, timeout_s: float = 60.0) -> None:
        """Let an in-flight refresh land (bounded), then stop the refreshers."""
        if self.lost:  # stop what is left of them; the dead rank never answers
            self.abandon_refreshers()
            return
        deadline = time.perf_counter() + timeout_s
        while self._busy and self._done is None and time.perf_counter() < deadline and self._error is None:
            time.sleep(0.01)
        self._todo.put(None)
        self._thread.join(timeout=timeout_s)


def serve_refresher(comm, trainer: int, shard_index: int, n_shards: int, make_encoder):
    """A refresher rank's life: wait for the run, then re-encode its shard for each weight snapshot received.

    make_encoder(run_dir) -> (doc encoder, block store, batch size). Returns the stop message: "lost" when the
    trainers gave up on this set of refreshers (a rank died; MPI_Finalize would hang).
    """
    from mpi4py import MPI

    status = MPI.Status()
    while not comm.Iprobe(source=trainer, tag=MPI.ANY_TAG, status=status):
        time.sleep(0.01)
    if status.Get_tag() == TAG_STOP:
        return comm.recv(source=trainer, tag=TAG_STOP)
    run_dir = comm.recv(source=trainer, tag=TAG_READY)
    encoder, blocks, batch_size = make_encoder(run_dir)
    rows = shard_range(len(blocks), n_shards, shard_index)
    _wait(comm.isend(None, dest=trainer, tag=TAG_READY))
    while True:
        while not comm.Iprobe(source=trainer, tag=MPI.ANY_TAG, status=status):
            time.sleep(0.005)
        if status.Get_tag() == TAG_STOP:
            return comm.recv(source=trainer, tag=TAG_STOP)
        header = np.empty(3, dtype=np.int64)
        _wait(comm.Irecv(header, source=trainer, tag=TAG_HEADER))
        flat = np.empty(int(header[2]), dtype=np.float32)
        _wait(comm.Irecv(flat, source=trainer, tag=TAG_WEIGHTS))
        load_flat_params(encoder, flat)
        t0 = time.perf_counter()
        emb = np.ascontiguousarray(encode_blocks(encoder, blocks, batch_size, indices=rows).cpu().numpy())
        # What this rank encoded, reported back so the trainers can check the shards tile the corpus.
        stats = np.asarray([header[0], time.perf_counter() - t0, rows.start, rows.stop], dtype=np.float64)
        _wait(comm.Isend(stats, dest=trainer, tag=TAG_STATS))
        _wait(comm.Isend(emb, dest=trainer, tag=TAG_EMBEDDINGS))


class RefresherSpawner:
    """Starts `count` replacement refreshers, collectively over the trainers' communicator (MPI_Comm_spawn of
    `python -m realm_hpc refresher`); ../shared/FACTS.md: works with mpich's hydra and Open MPI, and under srun when
    job steps may overlap (the CLI turns respawn off otherwise: `dist.spawn_would_wait_forever`). A launcher that
    refuses the call gets one warning line, and training goes on with the last index."""

    def __init__(self, comm, count: int, argv: tuple[str, ...] = ("-m", "realm_hpc", "refresher")):
        self.comm, self.count, self.argv = comm, count, list(argv)
        self.spawn_s = 0.0

    def spawn(self):
        """The inter-communicator to the new refreshers (their ranks 0..count-1), or None if the launcher refused."""
        from mpi4py import MPI

        t0 = time.perf_counter()
        try:
            inter = self.comm.Spawn(sys.executable, self.argv, maxprocs=self.count, root=0)
        except MPI.Exception as e:
            if self.comm.Get_rank() == 0:
                print(f"warning: no replacement refresher (MPI_Comm_spawn failed: {e.Get_error_string()}); "
                      "training goes on with the last index", file=sys.stderr, flush=True)
            return None
        self.spawn_s = time.perf_counter() - t0
        return inter


class TrainerBroadcastRefresher:
    """Several trainers, one MPIRefresher (on trainer 0). At each step boundary trainer 0 broadcasts whether a new
    version is in; if so, the embeddings follow over torch.distributed (`swap_from_trainer0`: all rows to a
    replicated index, each trainer's own rows to a sharded one) and every trainer swaps it in before the same step.
    The decision is trainer 0's, so the trainers never disagree on the version they use."""

    def __init__(self, inner: MPIRefresher | None, group, n_docs: int, dim: int,
                 spawner: RefresherSpawner | None = None):
        self.inner, self.group, self.n_docs, self.dim = inner, group, n_docs, dim
        self.spawner = spawner  # on every trainer: MPI_Comm_spawn is collective over them
        self.lost, self.losses = False, 0

    def step_boundary(self, step: int, doc_encoder: torch.nn.Module, live: LiveIndex) -> RefreshEvent:
        import torch.distributed as dist

        t0 = time.perf_counter()
        event = RefreshEvent()
        done = self.inner.take() if self.inner is not None else None
        lost = self.inner.check_lost() if self.inner is not None else False
        device = torch.device(self.group.comm_device)  # nccl: CUDA tensors only
        head = torch.tensor([done is not None, done.version if done else 0, done.weights_step if done else 0, lost],
                            dtype=torch.long, device=device)
        dist.broadcast(head, src=0)
        if head[3]:
            self.lost = event.lost = True
            self.losses += 1
            if self.spawner is not None:  # every trainer learnt of the loss at this same step: spawn together
                inter = self.spawner.spawn()
                if self.inner is not None:
                    event.respawned = self.inner.replace(inter)
                elif inter is not None:
                    self._inter = inter  # held, never used: only trainer 0 talks to the refreshers
                    event.respawned = inter.Get_remote_size()
                self.lost = not event.respawned
        if head[0]:
            swap_from_trainer0(live, done.embeddings if done is not None else None, int(head[1]), int(head[2]),
                               self.n_docs, self.dim, self.group)
            if self.inner is not None:
                self.inner.fill_event(event)
            event.swapped = True
        if self.inner is not None:
            event.sent = self.inner.maybe_send(step, doc_encoder, live.version, live.snapshot.weights_step)
        event.wait_s = time.perf_counter() - t0
        return event

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
