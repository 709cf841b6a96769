"""End to end: ``vlp pretrain`` (clip recipe) samples/s against open_clip_train on the same shards.

Both trainers read the same phantom studies (converted at 256 px by ``tools/make_shards.py
mimic``) from WebDataset shards, decode, augment, tokenise and batch them in DataLoader
workers, and train the same small CLIP model on one CPU process. The pairing:

========================  =============================  ===================================
part                      vlp (``recipes/clip.yaml`` +)  open_clip_train 3.3.0
========================  =============================  ===================================
image tower               timm resnet18, 1 channel,      timm resnet18 (``timm_model_name``),
                          avg pool, MLP head 512-512-512  3 channels, avg pool, MLP head
                                                          512-1024-512 (``timm_proj: mlp``)
text tower                ``tiny``: random BERT, 2        the same BertConfig through
                          layers, width 64, [CLS]         ``hf_model_name`` (random init,
                          pooling, MLP head 64-512-512    ``cls_last_hidden_state_pooler``,
                                                          MLP head 64-288-512)
tokenizer, text length    MiniLM (BERT uncased), at       the same tokenizer
                          most 77 tokens, padded to the   (``hf_tokenizer_name``), always
                          longest in the batch            padded to 77 (open_clip's way)
image input               128 px, random resized crop     128 px, RandomResizedCrop scale
                          of area 0.9–1.0, no affine      0.9–1.0 (open_clip's default)
loss, optimizer           CLIP InfoNCE, learnable         ClipLoss; AdamW (2 groups), cosine,
                          temperature; AdamW, per-tower   grad clip 1.0, fp32
                          groups, cosine, clip 1.0, fp32
                          under DeepSpeed (ZeRO stage of
                          the recipe)
data                      the shards as converted         a copy of the same shards holding
                          (frontal, lateral, priors,      only ``jpg`` (the frontal JPEG
                          json, txt); reads frontal +     bytes) and ``txt``: open_clip's
                          txt + json                      pipeline drops samples without a
                                                          ``jpg``/``png``/``jpeg``/``webp``
                                                          member, and a ``frontal.jpg``
                                                          member is keyed ``frontal.jpg``
batch, workers            16, ``--workers`` each          16, ``--workers`` each
========================  =============================  ===================================

vlp also sets ``data.sentences=false`` (open_clip has no per-sentence path and the clip
objective with ``text: report`` does not use them) and ``data.drop_last=true`` (open_clip
trains on full batches only), so both count ``16 × steps`` samples.

open_clip_torch 3.3.0's WebDataset pipeline fails with webdataset 1.0.x (``KeyError:
'fname'``); its side runs in a subprocess with webdataset 0.2.86 from a separate folder
(``--wds-target``, installed there with pip when missing). The custom model config is
registered with ``open_clip.add_model_config`` in that subprocess, which then calls
``open_clip_train.main.main``.

Timing, and why so: the cores are shared with other jobs that slow whole stretches of time
several-fold, so separate runs of the two trainers are not comparable. Both trainers run
at the same time, in lockstep: a baton passed through two named pipes at the end of every
training step (vlp: ``DeepSpeedEngine.step`` returning; open_clip: a global torch
optimizer step hook, its AdamW steps once per training step) lets exactly one of them
compute at a time, alternating step by step, so adjacent steps see the same outside load.
A step is timed from receiving the baton to the end of that step, data wait included. The
figure is the median over steps ``--warmup`` … last of the per-step ratio
``open_clip_k / vlp_k`` (start-up, the first steps and the final checkpoint are left
out), with the median step times, and the CPU seconds of each process tree (trainer and
its DataLoader workers) over the window. Caveat: DataLoader workers keep prefetching while
the other trainer holds the baton, so a loader that costs more CPU also slows the peer's
steps; the CPU-second figure attributes that work to its owner. Each run covers
``--epochs`` epochs of open_clip (its epoch restarts included); vlp runs the same number
of steps. Run::

    python benchmarks/openclip_compare.py         # 2-3 minutes on two idle cores
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from trainer_speed import (  # noqa: E402
    DEFAULT_WORK,
    SMALL_CLIP,
    ensure_phantom_shards,
)

WDS_VERSION = "0.2.86"
MODEL_NAME = "vlp-bench-rn18-tiny"
CONTEXT_LENGTH = 77
BATCH = 16
#: Overrides that make the vlp side do the same work as open_clip's (see the table above).
MATCH_OPEN_CLIP = [
    f"data.max_text_length={CONTEXT_LENGTH}",
    "data.augment.crop_scale=[0.9,1.0]",
    "data.augment.degrees=0.0",
    "data.augment.translate=0.0",
    "data.sentences=false",
    "data.drop_last=true",
]


# ----------------------------------------------------------------------------- inputs


def write_open_clip_shards(train: Path, out: Path) -> tuple[str, int]:
    """Copies of the train shards with ``KEY.jpg`` (frontal bytes) and ``KEY.txt`` only.

    Returns the brace pattern of the copies and the number of samples.
    """
    manifest = json.loads((train / "manifest.json").read_text())
    names = [entry["name"] for entry in manifest["shards"]]
    total = 0
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = out / name
        count = 0
        with tarfile.open(train / name) as source:
            members = {m.name: source.extractfile(m).read() for m in source if m.isfile()}
        keys = sorted({name.split(".", 1)[0] for name in members})
        if not target.is_file():
            partial = target.with_suffix(".partial")
            with tarfile.open(partial, "w") as sink:
                for key in keys:
                    for suffix, member in (("jpg", "frontal.jpg"), ("txt", "txt")):
                        data = members[f"{key}.{member}"]
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size = len(data)
                        sink.addfile(info, io.BytesIO(data))
            partial.rename(target)
        count = len(keys)
        total += count
    first, last = names[0][len("shard-") : -len(".tar")], names[-1][len("shard-") : -len(".tar")]
    return f"{out}/shard-{{{first}..{last}}}.tar", total


def write_model_config(folder: Path, text: str = "tiny", image_size: int = 128) -> tuple[Path, str]:
    """open_clip model config of the paired model; returns its path and model name.

    ``text``: ``tiny`` (the vlp ``tiny`` BertConfig, randomly initialised, CLS pooling) or
    ``minilm`` (the offline MiniLM that vlp's ``minilm`` tower loads, with its weights, mean
    pooling as ``recipes/demo.yaml`` sets it). ``image_size``: the tower's input side.
    """
    from vlp.models.text import load_tokenizer, minilm_path

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = str(minilm_path())
    if text == "minilm":
        hf_model, pooler, name = tokenizer_dir, "mean_pooler", f"{MODEL_NAME}-minilm"
    elif text == "tiny":
        hf_model, pooler, name = (
            str(folder / "tiny-bert"),
            "cls_last_hidden_state_pooler",
            MODEL_NAME,
        )
        write_tiny_bert(Path(hf_model), load_tokenizer(tokenizer_dir).vocab_size)
    else:
        raise ValueError(f"text tower {text!r}: expected tiny or minilm")
    config = {
        "embed_dim": 512,
        "vision_cfg": {
            "image_size": image_size,
            "timm_model_name": "resnet18",
            "timm_pool": "avg",
            "timm_proj": "mlp",
        },
        "text_cfg": {
            "hf_model_name": hf_model,
            "hf_tokenizer_name": tokenizer_dir,
            "hf_pooler_type": pooler,
            "hf_proj_type": "mlp",
            "context_length": CONTEXT_LENGTH,
        },
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    return path, name


def write_tiny_bert(bert: Path, vocab_size: int) -> None:
    """The vlp ``tiny`` text tower's BertConfig, randomly initialised, as an HF folder."""
    from transformers import BertConfig, BertModel

    from vlp.models.text import TinyTextParams

    tiny = TinyTextParams()
    # open_clip_train.main always loads the HF tower's weights (it never passes
    # pretrained_text=False), so the random initialisation is written as the "weights".
    BertModel(
        BertConfig(
            vocab_size=vocab_size,
            hidden_size=tiny.hidden_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            intermediate_size=tiny.intermediate_size,
            max_position_embeddings=tiny.max_position_embeddings,
        ),
        add_pooling_layer=False,
    ).save_pretrained(bert)


def ensure_old_webdataset(target: Path) -> None:
    if (target / "webdataset").is_dir():
        return
    print(f"installing webdataset=={WDS_VERSION} into {target} (open_clip 3.3.0 needs it)")
    # --no-deps: its dependencies are installed already and must not be shadowed.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         f"webdataset=={WDS_VERSION}"],
        check=True,
    )  # fmt: skip


# ----------------------------------------------------------------------------- children


class Baton:
    """Strict step-by-step alternation of two trainer processes through two named pipes.

    ``after_step`` is called at the end of every training step. The vlp side hands the
    baton over and waits for it; the open_clip side does the same from its second step on
    (its first step overlaps vlp's first, both inside the warm-up). When the peer process
    exits, its pipe end closes and this side runs on freely. Stamps: (wall, CPU seconds of
    this process and all its descendants) when a step ends and when the next one may start.
    """

    def __init__(self, folder: str, role: str):
        import psutil

        self.process = psutil.Process()
        self.role = role
        peer = "open_clip" if role == "vlp" else "vlp"
        self.send_path = Path(folder) / f"to_{peer}"
        self.recv_path = Path(folder) / f"to_{role}"
        self.send = self.recv = None
        self.peer_gone = False
        self.ends: list[tuple[float, float]] = []
        self.starts: list[tuple[float, float]] = []
        # the process start on the perf_counter scale (imports included)
        self.started = time.perf_counter() - (time.time() - self.process.create_time())

    def cpu(self) -> float:
        total = 0.0
        for proc in [self.process] + self.process.children(recursive=True):
            try:
                times = proc.cpu_times()
            except Exception:  # a worker that just exited
                continue
            total += times.user + times.system
        return total

    def _open(self) -> None:
        # Opening a FIFO blocks until the other end is opened: both sides open the
        # vlp→open_clip pipe first, then the other one, so neither waits on the other. The
        # pipes stay open for the life of the process: its exit is what tells the peer.
        if self.role == "vlp":
            self.send = open(self.send_path, "wb", buffering=0)  # noqa: SIM115
            self.recv = open(self.recv_path, "rb", buffering=0)  # noqa: SIM115
        else:
            self.recv = open(self.recv_path, "rb", buffering=0)  # noqa: SIM115
            self.send = open(self.send_path, "wb", buffering=0)  # noqa: SIM115

    def after_step(self, *_args) -> None:
        self.ends.append((time.perf_counter(), self.cpu()))
        if not self.peer_gone:
            if self.send is None:
                self._open()
            try:
                if not (self.role == "open_clip" and len(self.ends) == 1):
                    self.send.write(b"x")
                if not self.recv.read(1):
                    self.peer_gone = True
            except BrokenPipeError:
                self.peer_gone = True
        self.starts.append((time.perf_counter(), self.cpu()))

    def dump(self, path: str) -> None:
        Path(path).write_text(
            json.dumps({"ends": self.ends, "starts": self.starts, "started": self.started})
        )


def vlp_child(args) -> None:
    """``pretrain`` on the vlp shards; the baton at every ``DeepSpeedEngine.step``."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from vlp.config import load_recipe
    from vlp.training.trainer import pretrain

    baton = Baton(args.child_baton, "vlp")
    original = DeepSpeedEngine.step

    def step(engine, *a, **k):
        before = engine.global_steps
        result = original(engine, *a, **k)
        if engine.global_steps != before:  # an optimizer step, not a micro-step
            baton.after_step()
        return result

    DeepSpeedEngine.step = step
    cfg = load_recipe(args.recipe, json.loads(args.child_overrides))
    pretrain(cfg, run_dir=args.child_run_dir)
    baton.dump(args.child_out)


def open_clip_child(args) -> None:
    """open_clip_train.main with the paired model; the baton at every optimizer step."""
    import webdataset

    if webdataset.__version__ != WDS_VERSION:
        raise RuntimeError(
            f"open_clip side needs webdataset {WDS_VERSION} first on PYTHONPATH, got "
            f"{webdataset.__version__} from {webdataset.__file__}"
        )
    import open_clip
    from open_clip_train.main import main as open_clip_main
    from torch.optim.optimizer import register_optimizer_step_post_hook

    open_clip.add_model_config(args.child_model_config)
    baton = Baton(args.child_baton, "open_clip")
    # open_clip's AdamW (two groups) steps once per training step.
    register_optimizer_step_post_hook(baton.after_step)
    open_clip_main(json.loads(args.child_argv))
    baton.dump(args.child_out)


def step_times(data: dict, warmup: int) -> list[tuple[float, float]]:
    """(wall, tree CPU) of steps warmup+1 … last: from being allowed to start to ending."""
    starts, ends = data["starts"], data["ends"]
    return [
        (ends[k][0] - starts[k - 1][0], ends[k][1] - starts[k - 1][1])
        for k in range(max(1, warmup), len(ends))
    ]


# ----------------------------------------------------------------------------- runs


def epoch_steps(samples: int, shards: int, workers: int) -> int:
    """Training steps of one open_clip epoch: ceil(N / batch) batches, rounded up to a
    multiple of the workers (each worker reads >= 1 shard)."""
    if shards < workers:
        raise SystemExit(
            f"open_clip needs >= 1 shard per worker: {shards} shards, {workers} workers"
        )
    return math.ceil(math.ceil(samples / BATCH) / max(1, workers)) * max(1, workers)


def open_clip_argv(
    pattern: str,
    samples: int,
    model_name: str,
    workers: int,
    epochs: int,
    log_every: int,
    lr: float = 1e-4,
    warmup: int = 500,
) -> list[str]:
    """open_clip_train arguments of the pairing (module docstring); ``run_lockstep`` adds
    ``--logs`` and ``--name``."""
    return [
        "--train-data", pattern,
        "--train-num-samples", str(samples),
        "--dataset-type", "webdataset",
        "--model", model_name,
        "--batch-size", str(BATCH),
        "--workers", str(workers),
        "--epochs", str(epochs),
        "--lr", str(lr),
        "--wd", "1e-6",
        "--warmup", str(warmup),
        "--grad-clip-norm", "1.0",
        "--precision", "fp32",
        "--seed", "0",
        "--log-every-n-steps", str(log_every),
    ]  # fmt: skip


def run_lockstep(
    work: Path,
    tag: str,
    recipe: str,
    vlp_overrides: list[str],
    oc_argv: list[str],
    model_config: Path,
    wds_target: str,
    steps: int,
    keep_runs: bool = False,
) -> dict:
    """Both trainers at once, in lockstep through a baton (module docstring).

    The children are this script (``--child``); their logs are ``work/TAG-SIDE.log``, run
    folders ``work/runs/TAG-SIDE`` (open_clip's checkpoints under ``checkpoints/``),
    removed unless ``keep_runs``. Returns each side's baton stamps (``{"vlp": ..,
    "open_clip": ..}``) and ``run_dirs``.
    """
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    baton_dir = Path(tempfile.mkdtemp(prefix="baton-", dir=work))
    for name in ("to_vlp", "to_open_clip"):
        os.mkfifo(baton_dir / name)
    children = {}
    for side in ("vlp", "open_clip"):
        out = work / f"{tag}-{side}.json"
        out.unlink(missing_ok=True)
        run_dir = work / "runs" / f"{tag}-{side}"
        shutil.rmtree(run_dir, ignore_errors=True)  # open_clip refuses an existing one
        if side == "vlp":
            extra = [
                "--recipe", recipe,
                "--child-overrides", json.dumps(vlp_overrides),
                "--child-run-dir", str(run_dir),
            ]  # fmt: skip
            env = base_env
        else:
            argv = oc_argv + ["--logs", str(run_dir.parent), "--name", run_dir.name]
            extra = ["--child-argv", json.dumps(argv), "--child-model-config", str(model_config)]
            env = dict(base_env, PYTHONPATH=wds_target)
        command = [sys.executable, __file__, "--child", side, "--child-out", str(out)]
        command += ["--child-baton", str(baton_dir)] + extra
        log = open(work / f"{tag}-{side}.log", "w")  # noqa: SIM115 (closed below)
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        children[side] = (process, out, run_dir, log)
    data: dict = {"run_dirs": {}}
    for side, (process, out, run_dir, log) in children.items():
        code = process.wait()
        log.close()
        data["run_dirs"][side] = run_dir
        if not keep_runs:
            shutil.rmtree(run_dir, ignore_errors=True)  # a vlp checkpoint is ~230 MB
        if code != 0 or not out.is_file():
            tail = Path(log.name).read_text()[-4000:]
            raise RuntimeError(f"{side} run failed (exit {code}), log {log.name}:\n{tail}")
        data[side] = json.loads(out.read_text())
        if len(data[side]["ends"]) != steps:
            raise RuntimeError(
                f"{side}: expected {steps} training steps, counted {len(data[side]['ends'])}"
            )
    shutil.rmtree(baton_dir, ignore_errors=True)
    return data


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "clip.yaml"))
    parser.add_argument("--set", action="append", default=[], help="extra vlp recipe override")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers, both sides")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start")
    parser.add_argument("--rounds", type=int, default=1, help="lockstep runs")
    parser.add_argument("--epochs", type=int, default=1, help="open_clip epochs per run")
    parser.add_argument("--patients", type=int, default=150, help="phantom patients")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="shards and run folders")
    parser.add_argument("--wds-target", default="/tmp/wds0286", help="webdataset 0.2.86 folder")
    parser.add_argument("--child", choices=("vlp", "open_clip"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-overrides", help=argparse.SUPPRESS)
    parser.add_argument("--child-run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-argv", help=argparse.SUPPRESS)
    parser.add_argument("--child-model-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-baton", help=argparse.SUPPRESS)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.child == "vlp":
        sys.path.insert(0, str(REPO))
        vlp_child(args)
        return
    if args.child == "open_clip":
        open_clip_child(args)
        return

    sys.path.insert(0, str(REPO))
    import importlib.util

    from tqdm import tqdm

    if importlib.util.find_spec("open_clip_train") is None:
        raise SystemExit(
            "open_clip_train is not importable: it ships in the open_clip_torch wheel "
            "(pip install open_clip_torch==3.3.0)"
        )

    work = Path(args.work)
    train = ensure_phantom_shards(work, args.patients)
    pattern, samples = write_open_clip_shards(train, work / "openclip-shards")
    model_config, model_name = write_model_config(work / "openclip-model")
    ensure_old_webdataset(Path(args.wds_target))
    shards = len(json.loads((train / "manifest.json").read_text())["shards"])
    steps = epoch_steps(samples, shards, args.workers) * args.epochs

    vlp_overrides = (
        SMALL_CLIP
        + MATCH_OPEN_CLIP
        + [
            f"data.shards={train / 'manifest.json'}",
            f"data.workers={args.workers}",
            f"train.steps={steps}",
            f"train.log_every={steps}",
            f"checkpoint.every={steps}",
            "checkpoint.keep=1",
        ]
        + args.set
    )
    print(
        f"{samples} phantom studies in {shards} shards, batch {BATCH}, {args.workers} worker(s) "
        f"per side, {steps} steps per run, {os.cpu_count()} cores\n"
        f"vlp: {args.recipe} + {' '.join(vlp_overrides)}\n"
        f"open_clip: custom model {model_name} ({model_config})",
        flush=True,
    )
    rounds = []
    for run in tqdm(range(args.rounds), desc="lockstep runs (vlp + open_clip)", unit="run"):
        argv = open_clip_argv(pattern, samples, model_name, args.workers, args.epochs, steps)
        rounds.append(
            run_lockstep(
                work, f"compare-{run}", args.recipe, vlp_overrides, argv, model_config,
                args.wds_target, steps,
            )
        )  # fmt: skip

    print(
        f"\nsteady state: steps {args.warmup + 1}..{steps} of each run, in lockstep, "
        f"{args.rounds} run(s); load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for run, data in enumerate(rounds):
        vlp, oc = step_times(data["vlp"], args.warmup), step_times(data["open_clip"], args.warmup)
        pairs = list(zip(vlp, oc))
        vlp_s = statistics.median(v[0] for v, _ in pairs)
        oc_s = statistics.median(o[0] for _, o in pairs)
        ratio = statistics.median(o[0] / v[0] for v, o in pairs)
        vlp_cpu = BATCH * len(pairs) / sum(v[1] for v, _ in pairs)
        oc_cpu = BATCH * len(pairs) / sum(o[1] for _, o in pairs)
        print(
            f"run {run}: vlp {BATCH / vlp_s:6.2f} samples/s (median step {vlp_s:.3f} s) | "
            f"open_clip {BATCH / oc_s:6.2f} samples/s (median step {oc_s:.3f} s) | ratio "
            f"{ratio:.3f} (median of per-step open_clip/vlp over {len(pairs)} pairs)\n"
            f"       per CPU second of the process tree: vlp {vlp_cpu:6.2f} | open_clip "
            f"{oc_cpu:6.2f} | ratio {vlp_cpu / oc_cpu:.3f}"
        )
        for side in ("vlp", "open_clip"):
            startup = data[side]["ends"][0][0] - data[side]["started"]
            print(f"       {side}: {startup:5.1f} s from process start to the end of step 1")
    print("target: vlp / open_clip >= 1.0 (steady-state samples/s)")


if __name__ == "__main__":
    main()
