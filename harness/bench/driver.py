"""``python -m harness bench``: latency, #FW, peak memory and throughput of every method.

One process, one model, one batch of random images in [0, 1], one thread count. Per backbone:

* **floor**: a plain ``backbone(images)`` forward, in ms per image. A floor sample is taken
  before the first and after every timed repetition of every method; each repetition's
  ratio uses the mean of the samples either side of it, so drifts in machine load cancel.
* **our methods** (gradcam, gradcampp, scorecam, rise, lcam_fm, lcam_img): ``explain`` time
  per explained image and ``x(FWmeas*fwd)``, its ratio to (#FW x floor), #FW being the count
  the method *measured* (``last_forward_passes``: exact savings such as Score-CAM's skipped
  constant channels make it lower than nominal); ``x(FWrun*fwd)`` uses the nominal count of
  what ran. The clean prediction forward is timed but is not in #FW (docs/protocol.md section 2),
  so a one-pass method at 1.00x costs exactly one forward, and a subset run of N passes
  carries 1/N of clean-forward overhead: ``x(passes*fwd)`` divides by every image that
  entered the backbone's first layer (``passes``, counted by a forward pre-hook). The target
  (``<= 1.1``) is checked on ``x(FWmeas*fwd)``. ``x cpu`` is the same ratio in process CPU
  time, a cross-check when the machine is shared.
* **pytorch-grad-cam** GradCAM, GradCAMPlusPlus and ScoreCAM on the same ``SplitBackbone``,
  target layer = the last module of ``backbone.body``. Its gradient methods need gradients
  through the backbone, so its parameters are made trainable while they run, as they are
  in an ordinary torchvision model (frozen again afterwards). Its ScoreCAM uses our forward
  batch (``batch_size`` attribute); its tqdm progress bar is replaced by a no-op. Its #FW
  is the pass count (minus its clean forward for ScoreCAM).
* Costly methods run on a *subset*, never extrapolated from a per-pass time:
  ``--rise-masks N`` runs RISE with N masks; ``--scorecam-channels k`` runs Score-CAM on the
  first k feature channels (the method's own code on A[:, :k]: the map is a partial sum, the
  time is exactly that of k channels; the library likewise); ``--rise-images`` and
  ``--scorecam-images`` explain fewer images. The ``run`` column says what ran; their
  warm-up is a one-batch run of the same code.
* **peak memory** (MiB above the level before the call): on Linux the RSS high-water mark
  (``VmHWM``), reset through ``/proc/self/clear_refs`` after ``gc`` and ``malloc_trim``;
  on CUDA ``torch.cuda.max_memory_allocated`` above the allocated level before; elsewhere
  ``ru_maxrss`` growth (a lower bound). Taken on each method's first full-size run. A RISE
  probe compares the peak for 1 and 4 batches of masks: memory must not grow with N.
* **L-CAM training**: images/s of ``lcam_train.train_step`` (Fm and Img, SGD step included)
  against a head-only training step: frozen ``features`` without autograd, the same
  attention head, cross-entropy of its spatially pooled maps, backward and SGD step (the
  least any head training on a frozen backbone costs). Round-robin repetitions.
* **evaluation**: ``harness.evaluation.run_shard`` on an in-memory shard of ``--eval-images``
  (its dataset and backbone loaders are patched to return these images and this model:
  data loading is not timed; explain, AD/IC scoring, localisation columns and the Parquet
  write are). If ``run_shard`` fails, ``protocol.Evaluator.evaluate_explainer`` on one batch
  is measured instead and the JSON says so.

Median and min-max over ``--repeats`` repetitions (``--costly-repeats`` for the costly
entries) after ``--warmup`` runs; ``torch.cuda.synchronize`` around each on GPU. Float32
denormals are flushed (random-init networks make many). A rich table is printed and a JSON
file written atomically. The load average is recorded: two OpenMP threads on a loaded
machine can stall for seconds per call; ``OMP_WAIT_POLICY=PASSIVE`` avoids it (recorded).

This module is the command (options, checks, driver, table, JSON); the timing machinery is
``harness.bench.timing`` and what is measured ``harness.bench.cases``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.bench.cases import (LIBRARY, OURS, bench_evaluation, bench_training, display,
                            library_case, our_case, rise_memory_probe)
from harness.bench.timing import TARGET_RATIO, Bench, _summary, memory_method
from harness.data.cache import write_text_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m harness bench``."""
    a = parser.add_argument
    a("--backbones", nargs="+", default=["resnet50", "vgg16"])
    a("--weights", default=None, help="backbone weights (default: random init; never downloads)")
    a("--size", type=int, default=224, help="input side in pixels")
    a("--batch", type=int, default=8, help="images per batch (the floor's batch)")
    a("--threads", type=int, default=2, help="torch intra-op threads")
    a("--repeats", type=int, default=5, help="timed repetitions per method")
    a("--warmup", type=int, default=1, help="untimed runs before timing")
    a("--methods", nargs="+", default=None,
      help=f"any of {', '.join(OURS + LIBRARY)} (default: all; with --pipeline: the "
           "one-pass methods)")
    a("--perturbation-batch", type=int, default=None,
      help="masked images per forward in Score-CAM and RISE (default: --batch)")
    a("--costly-repeats", type=int, default=None,
      help="timed repetitions of Score-CAM, RISE, the pytorch-grad-cam methods, the training "
           "steps and the evaluation shard (default: min(repeats, 3))")
    a("--rise-masks", type=int, default=None, help="masks run (default: the paper's N)")
    a("--rise-images", type=int, default=1, help="images explained by RISE")
    a("--scorecam-channels", type=int, default=None,
      help="run Score-CAM on the first k feature channels (default: all K)")
    a("--scorecam-images", type=int, default=1, help="images explained by Score-CAM")
    a("--eval-method", default="lcam_fm", help="method of the evaluation-throughput run")
    a("--eval-images", type=int, default=None, help="images in the evaluated shard (default 2x batch)")
    a("--no-train", action="store_true", help="skip the L-CAM training throughput")
    a("--no-eval", action="store_true", help="skip the evaluation throughput")
    a("--out", default="bench-results/bench.json", help="JSON results file")
    a("--device", choices=("cpu", "cuda"), default="cpu")
    a("--channels-last", action="store_true", help="model and images in channels_last")
    a("--autocast", action="store_true",
      help="torch.autocast for inference (bfloat16 on CPU, float16 on CUDA)")
    a("--keep-denormals", action="store_true",
      help="do not flush float32 denormals (random-init networks produce many; they are 10-100x "
           "slower on CPU)")
    a("--seed", type=int, default=0)
    a("--pipeline", action="store_true", help="the whole evaluation (decode once, load, "
      "explain, AD/IC, write) against the explanation alone (harness.bench.pipeline)")
    a("--pipeline-images", type=int, default=32, help="generated images of --pipeline")
    a("--memory-images", type=int, default=None,
      help="with --pipeline: peak memory of a real run over N generated images instead")
    a("--dispatch", action="store_true", help="the start cost of a shard per way of running "
      "it on Ray: a task in a fresh process, a task in a reused one, a long-lived worker "
      "(harness.bench.dispatch)")
    a("--dispatch-shards", type=int, default=20, help="shards of --dispatch")
    a("--dispatch-images", type=int, default=8, help="images per shard of --dispatch")
    a("--training-input", action="store_true", help="the head training's input: images "
      "per second at each number of loader processes (harness.bench.training_input)")
    a("--training-input-workers", type=int, nargs="+", default=[0, 1, 2],
      help="loader processes of --training-input (0: decoded in the training process)")
    a("--training-input-images", type=int, default=256,
      help="generated 375x500 JPEGs of --training-input")
    a("--validate", metavar="SPEC", default=None, help="the time and memory of `validate SPEC` "
      "against the same check with the imports it no longer needs (harness.bench.validate_time)")
    a("--validate-repeats", type=int, default=5, help="fresh interpreters per way of --validate")


# -- driver, table, JSON ----------------------------------------------------------------------
def _environment(args) -> dict:
    from importlib import metadata
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
           **{k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
              if k in os.environ}}
    for pkg in ("torch", "torchvision", "grad-cam"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not-installed"
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        env["git_commit"] = "unknown"
    return env


def write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def render(results: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table
    for name, r in results["backbones"].items():
        fl = r["floor"]["ms_per_image"]
        t = Table(title=f"{name}: plain forward {fl['median']:.1f} ms/img "
                        f"[{fl['min']:.1f}-{fl['max']:.1f}] (batch {results['config']['batch']}, "
                        f"{results['config']['threads']} threads, {results['config']['device']})",
                  title_justify="left")
        for col in ("method", "impl", "run", "ms/img med [min-max]", "#FW nom/run/meas",
                    "passes", "x(FWmeas*fwd) med [min-max]", "x(FWrun*fwd)", "x(passes*fwd)",
                    "x cpu", "peak MiB", "target"):
            t.add_column(col, overflow="fold")
        for key, m in r["methods"].items():
            if "error" in m:
                t.add_row(m["display_name"], "", f"[red]error: {escape(m['error'])}[/red]")
                continue
            ms, ra = m["ms_per_image"], m["ratio"]
            target = ("-" if "target" not in m else
                      ("met" if m["target"]["met"] else "[red]MISSED[/red]") + f" <={TARGET_RATIO}")
            t.add_row(m["display_name"], m["impl"], m["run"],
                      f"{ms['median']:.1f} [{ms['min']:.1f}-{ms['max']:.1f}]",
                      f"{m['fw_nominal']:g}/{m['fw_run']:g}/{m['fw_measured']:g}",
                      f"{m['passes_counted']:g}",
                      f"{ra['median']:.2f} [{ra['min']:.2f}-{ra['max']:.2f}]",
                      f"{m['ratio_run']['median']:.2f}", f"{m['ratio_passes']['median']:.2f}",
                      f"{m['ratio_cpu']['median']:.2f}",
                      "-" if m["peak_mib"] is None else f"{m['peak_mib']:.0f}", target)
        console.print(t)
        if "rise_memory" in r:
            rm = r["rise_memory"]
            console.print(f"  RISE peak MiB by masks run {rm['masks_to_peak_mib']} at batch "
                          f"{rm['batch_size']}: {'bounded' if rm['bounded'] else 'GROWS with N'}")
        if "train" in r:
            tr = r["train"]
            console.print("  training: " + "; ".join(
                f"{k} {v['images_per_s']:.1f} img/s ({v['ratio_to_head_only_step']:.2f}x head-only "
                f"step, {v['ratio_to_forward']:.2f}x forward)" for k, v in tr.items() if k != "baseline"))
        if "eval" in r:
            ev = r["eval"]
            parts = [f"{k} {v['images_per_s']:.1f} img/s ({v['forwards_equivalent']:.2f} forwards/img)"
                     for k, v in ev.items() if isinstance(v, dict) and "images_per_s" in v]
            errs = [f"{k}: {v['error']}" for k, v in ev.items() if isinstance(v, dict) and "error" in v]
            console.print(f"  evaluation ({ev['method']}, {ev['images']} img shard): "
                          + "; ".join(parts + errs))


def _known(registry, name: str) -> bool:
    """Whether ``name`` resolves in the registry (built in, a plugin or a class reference)."""
    try:
        registry.REGISTRY.get(name)
    except (KeyError, ValueError):
        return False
    return True


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when it ran (targets missed are reported, not failed), 2 on usage."""
    from harness.terminal import make_console
    import backbones
    import methods
    console = make_console()
    err = make_console(stderr=True)
    if args.pipeline:
        return _pipeline(args, console)
    if args.dispatch:
        return _dispatch(args, console)
    if args.validate:
        return _validate(args, console)
    if args.training_input:
        return _training_input(args, console)
    args.methods = args.methods or [*OURS, *LIBRARY]
    unknown = [m for m in args.methods if m not in OURS + LIBRARY and not _known(methods, m)]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; choose from "
              f"{', '.join(OURS + LIBRARY)}", file=sys.stderr)
        return 2
    bad_bb = [n for n in args.backbones if not _known(backbones, n)]
    if bad_bb:
        print(f"error: unknown backbone(s) {', '.join(bad_bb)}; available: "
              f"{', '.join(backbones.names())}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    small = [f"--{k.replace('_', '-')}" for k in ("size", "batch", "threads", "repeats",
                                                 "rise_images", "scorecam_images")
             if getattr(args, k) < 1]
    small += [f"--{k.replace('_', '-')}" for k in ("perturbation_batch", "costly_repeats",
                                                  "rise_masks", "scorecam_channels", "eval_images")
              if getattr(args, k) is not None and getattr(args, k) < 1]
    if small or args.warmup < 0:
        print(f"error: {', '.join(small or ['--warmup'])} must be positive", file=sys.stderr)
        return 2
    if not _known(methods, args.eval_method):
        print(f"error: --eval-method {args.eval_method!r} is not a method", file=sys.stderr)
        return 2
    if any(m.startswith("pgc_") for m in args.methods):
        try:
            import pytorch_grad_cam  # noqa: F401
        except ImportError:
            err.print("pytorch-grad-cam (grad-cam) is not installed: its methods are skipped")
            args.methods = [m for m in args.methods if not m.startswith("pgc_")]
    threads_before = torch.get_num_threads()
    try:
        return _run(args, console, err)
    finally:
        torch.set_num_threads(threads_before)


def _dispatch(args: argparse.Namespace, console) -> int:
    """``--dispatch``: see ``harness.bench.dispatch``; a table and the JSON file."""
    from harness.bench import dispatch
    if args.dispatch_shards < 1 or args.dispatch_images < 1:
        print("error: --dispatch-shards and --dispatch-images must be positive",
              file=sys.stderr)
        return 2
    from harness.pipeline import ray_runtime
    ray_runtime.prepare_environment(None)             # before ray is imported
    return _write_and_show(args, console, "dispatch", dispatch.run(args), dispatch.table)


def _write_and_show(args: argparse.Namespace, console, kind: str, measured: dict,
                    table) -> int:
    """The results of one bench mode (schema ``lcam-bench/<kind>/1``, the command line and
    the environment) written atomically to ``--out``, then its table."""
    results = {"schema": f"lcam-bench/{kind}/1", "argv": sys.argv,
               "environment": _environment(args), **measured}
    write_json_atomic(results, Path(args.out))
    console.print(table(results))
    console.print(f"wrote {args.out}")
    return 0


def _training_input(args: argparse.Namespace, console) -> int:
    """``--training-input``: see ``harness.bench.training_input``; a table and the JSON."""
    from harness.bench import training_input
    if (args.training_input_images < args.batch or args.batch < 1 or args.threads < 1
            or any(w < 0 for w in args.training_input_workers)):
        print("error: --training-input needs --batch >= 1, --threads >= 1, "
              "--training-input-images >= --batch and --training-input-workers >= 0",
              file=sys.stderr)
        return 2
    return _write_and_show(args, console, "training-input", training_input.run(args),
                           training_input.table)


def _validate(args: argparse.Namespace, console) -> int:
    """``--validate SPEC``: see ``harness.bench.validate_time``; a table and the JSON file."""
    from harness.bench import validate_time
    if not Path(args.validate).is_file() or args.validate_repeats < 1:
        print(f"error: --validate needs a spec file (not found: {args.validate}) and "
              "--validate-repeats >= 1", file=sys.stderr)
        return 2
    return _write_and_show(args, console, "validate",
                           validate_time.run(args.validate, args.validate_repeats),
                           validate_time.table)


def _pipeline(args: argparse.Namespace, console) -> int:
    """``--pipeline``: see ``harness.bench.pipeline``; a table and the JSON file."""
    from rich.table import Table

    from harness.bench import pipeline
    from harness.bench.cases import ONE_PASS
    args.methods = args.methods or list(ONE_PASS)
    results = {"schema": "lcam-bench/pipeline/1", "argv": sys.argv,
               "environment": _environment(args), **pipeline.run(args)}
    write_json_atomic(results, Path(args.out))
    if "memory" in results:
        m = results["memory"]
        console.print(f"{m['images']} images in {m['seconds']:.0f} s: driver peak "
                      f"{m['driver_peak_mib']:.0f} MiB ({m['driver_anon_peak_mib']:.0f} "
                      f"anonymous), worker peak {m['worker_peak_mib']:.0f} MiB "
                      f"({m['worker_anon_peak_mib']:.0f} anonymous)")
        return 0
    table = Table(title=f"whole evaluation vs explain + 3 masked forwards ({args.device}, "
                        f"batch {args.batch}, {args.threads} threads)")
    for col in ("backbone", "method", "decode once ms/img", "whole ms/img",
                "explain+3 fwd ms/img", "ratio", "img/s"):
        table.add_column(col, justify="right")
    for name, r in results["backbones"].items():
        for method, m in r["methods"].items():
            table.add_row(name, method, f"{r['decode_once_ms_per_image']:.1f}",
                          f"{m['whole_ms_per_image']:.1f}", f"{m['compute_ms_per_image']:.1f}",
                          f"{m['ratio']:.2f}", f"{m['images_per_s']:.1f}")
    console.print(table)
    console.print(f"wrote {args.out}")
    return 0


def _bench_backbone(args: argparse.Namespace, name: str, err) -> dict[str, Any]:
    """Every asked method on one backbone, the floor samples, RISE's memory probe, training
    and evaluation throughput."""
    b = Bench(args, name)
    for _ in range(max(args.warmup, 1)):
        b.floor_once()
    b.floor_samples.clear()
    b.floor_cpu.clear()
    for _ in range(max(args.repeats, 1)):
        b.floor_once()
    r: dict[str, Any] = {"methods": {}}
    for key in args.methods:
        err.log(f"{name}: {key}")
        close = None
        try:
            case = library_case(b, key) if key in LIBRARY else our_case(b, key)
            close = case.extra.pop("close", None)
            r["methods"][key] = b.measure(case)
        except Exception as exc:  # e.g. the library under --autocast on CPU (no bf16 numpy)
            r["methods"][key] = {"display_name": display(key),
                                 "error": f"{type(exc).__name__}: {exc}"}
            err.print(f"{name}: {key} failed: {type(exc).__name__}: {exc}")
        finally:
            if close:
                close()
    r["floor"] = {"ms_per_image": _summary([s * 1e3 for s in b.floor_samples]),
                  "cpu_ms_per_image": _summary([s * 1e3 for s in b.floor_cpu]),
                  "batch": args.batch, "samples": "all plain forwards taken during the run"}
    if "rise" in args.methods:
        err.log(f"{name}: RISE memory probe")
        r["rise_memory"] = rise_memory_probe(b)
    if not args.no_train:
        err.log(f"{name}: L-CAM training throughput")
        r["train"] = bench_training(b)
    if not args.no_eval:
        err.log(f"{name}: evaluation throughput")
        r["eval"] = bench_evaluation(b)
    b.counter.close()
    return r


def _run(args: argparse.Namespace, console, err) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    flush = torch.set_flush_denormal(not args.keep_denormals) and not args.keep_denormals
    dev = torch.device(args.device)
    results: dict[str, Any] = {
        "schema": "lcam-bench/bench/1", "argv": sys.argv,
        "config": {k: v for k, v in vars(args).items() if not callable(v)},
        "environment": _environment(args), "loadavg_start": os.getloadavg(),
        "memory_method": memory_method(dev), "flush_denormal": flush,
        "timing_method": ("median and min-max over repetitions after warm-up, perf_counter, "
                          "torch.cuda.synchronize on GPU; ratios use the floor measured just "
                          "before and after each repetition"),
        "backbones": {}, "targets": []}
    started = time.perf_counter()
    for name in args.backbones:
        r = _bench_backbone(args, name, err)
        for key, m in r["methods"].items():
            if "target" in m:
                results["targets"].append({"backbone": name, "method": key,
                                           "ratio": m["ratio"]["median"], **m["target"]})
        if "rise_memory" in r:
            results["targets"].append({"backbone": name, "method": "rise",
                                       "quantity": "peak memory bounded by batch, not N",
                                       "met": r["rise_memory"]["bounded"]})
        results["backbones"][name] = r
    results["wall_seconds"] = time.perf_counter() - started
    results["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    write_json_atomic(results, out)
    render(results, console)
    missed = [f"{t['backbone']}/{t['method']}" for t in results["targets"] if not t["met"]]
    console.print(f"targets: {len(results['targets']) - len(missed)}/{len(results['targets'])} met"
                  + (f"; missed: {', '.join(missed)}" if missed else ""))
    console.print(f"wrote {out} in {results['wall_seconds']:.0f} s (load average "
                  f"{results['loadavg_start'][0]:.1f} -> {results['loadavg_end'][0]:.1f})")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m harness.bench.driver", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
