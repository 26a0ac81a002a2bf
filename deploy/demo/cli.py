"""`make demo` = `python -m lineguard.deploy.demo`: the whole line on one laptop.

From the committed sample line (two PIPED paper types, CC BY 4.0) to defect alerts received over
MQTT, through the same commands a plant would use, each shown before it runs:

 1 train a small OneNIP on the CPU (the GPU when there is one)   `lineguard train`
 2 evaluate it on the sample test images                         `lineguard evaluate`
 3 export to ONNX + OpenVINO, parity-gated                       `lineguard export`
 4 quantize the detector to INT8, accuracy-gated                 `lineguard quantize`
 5 write the site and two station configs, validate them         `lineguard validate-config`
 6 calibrate each station's thresholds on its normal images      `lineguard calibrate`
 7 sign and build a bundle, verify it                            `lineguard bundle ...`
 8 start a local mosquitto (when installed)
 9 install the bundle into demo-out/edge, health-checked         `lineguard deploy install`
10 run the runtime from `current` on folder-replay cameras       `lineguard run`
   while a subscriber prints every defect alert it receives
11 stop the runtime (SIGTERM) and write demo-out/report.html

Every stage runs in its own `lineguard` process: this module never imports torch.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lineguard.deploy.demo.line import LineRun
from lineguard.deploy.demo.report import StepRecord, write_report
from lineguard.deploy.demo.support import (
    LocalBroker,
    Observed,
    StationInfo,
    Subscriber,
    find_mosquitto,
    last_json_object,
    run_logged,
    shown,
)

REPO = Path(__file__).resolve().parents[2]
# station template file -> sample-line category it inspects
STATIONS = {"paper-flr02": "pa_flr02_tl", "paper-bdp01": "pa_bdp01_tl"}
TOTAL_STEPS = 11
QUICK_EPOCHS = 5


class DemoError(Exception):
    """A step failed; the message says which and where its log is."""


def _child_cpu() -> float:
    """CPU seconds (user + system) of the finished `lineguard` processes: unlike wall time, not
    inflated when other work shares the machine."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _rel(p: Path) -> str:
    """`p` relative to the working directory when it lies inside it."""
    rel = os.path.relpath(p)
    return str(p) if rel.startswith("..") else rel


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.configs = Path(args.configs).absolute()
        self.sample = self.configs / "sample_line"
        self.out = Path(args.out).absolute()
        self.logs = self.out / "logs"
        self.steps: list[StepRecord] = []
        self.seen = Observed()
        self.stations = [StationInfo(sid, cat) for sid, cat in STATIONS.items()]
        self.precision = "int8"
        self.broker: LocalBroker | None = None
        self.transport = "nowhere"
        self.line = LineRun(self.stations, self.seen, mqtt=False)
        self._n = 0

    # ------------------------------------------------------------------ step plumbing

    def banner(self, title: str) -> StepRecord:
        self._n += 1
        bar = "=" * max(4, 74 - len(title))
        print(f"\n== [{self._n}/{TOTAL_STEPS}] {title} {bar}", flush=True)
        rec = StepRecord(title)
        self.steps.append(rec)
        return rec

    def lg(
        self, rec: StepRecord, name: str, template: str, check: bool = True, **values: Any
    ) -> tuple[int, str]:
        """Run `lineguard TEMPLATE` for step `rec` (each word formatted with `values`, so paths
        with spaces stay one argument), shown, logged and recorded in the step."""
        argv = [word.format(**values) for word in shlex.split(template)]
        line = shown(argv)
        rec.command = f"{rec.command}\n{line}".strip()
        print(f"$ {line}", flush=True)
        log = self.logs / f"{len(self.steps):02d}-{name}.log"
        code, text = run_logged(argv, log)
        if code != 0 and check:
            raise DemoError(f"`{line}` failed (exit {code}); log: {_rel(log)}")
        return code, text

    def step(self, title: str, fn: Callable[[StepRecord], None]) -> None:
        rec = self.banner(title)
        t0, c0 = time.monotonic(), _child_cpu()
        try:
            fn(rec)
        except BaseException:
            rec.status = "failed"
            raise
        finally:
            rec.seconds = time.monotonic() - t0
            rec.cpu_seconds = _child_cpu() - c0
        mark = {"ok": "done", "skipped": "skipped"}.get(rec.status, rec.status)
        note = f" ({rec.note})" if rec.note else ""
        print(f"-> {mark} in {rec.seconds:.1f} s{note}", flush=True)

    # ------------------------------------------------------------------ the steps

    def train(self, rec: StepRecord) -> None:
        final = self.out / "train" / "final.pt"
        if self.args.reuse_model and final.is_file():
            rec.status, rec.note = "skipped", f"--reuse-model: {_rel(final)}"
            return
        threads = self.args.threads or max(1, min(os.cpu_count() or 2, 8))
        n = self.args.epochs or (QUICK_EPOCHS if self.args.quick else None)
        epochs = f" --epochs {n}" if n else ""
        _, text = self.lg(
            rec, "train", "train --config {cfg} --out {out} --threads {n}" + epochs,
            cfg=self.configs / "train.yaml", out=self.out / "train", n=threads,
        )  # fmt: skip
        summary = last_json_object(text) or {}
        if "val_synthetic_image_auroc" in summary:
            rec.note = f"val AUROC on synthetic defects {summary['val_synthetic_image_auroc']:.2f}"

    def evaluate(self, rec: StepRecord) -> None:
        if self.args.quick:
            rec.status, rec.note = "skipped", "--quick"
            return
        self.lg(
            rec, "evaluate", "evaluate --checkpoint {out}/train/final.pt --data {data} "
            "--out {out}/eval --no-progress", out=self.out, data=self.sample,
        )  # fmt: skip

    def export(self, rec: StepRecord) -> None:
        self.lg(
            rec, "export", "export --checkpoint {out}/train/final.pt --out {out}/model "
            "--name demo-sample-line --force", out=self.out,
        )  # fmt: skip

    def quantize(self, rec: StepRecord) -> None:
        # quick: one rung of the INT8 ladder, no accuracy control (a refusal still exercises
        # the FP32 fallback); the full demo lets the ladder find a scheme that passes
        control = (
            " --scheme full --preset performance --float-ops f32"
            if self.args.quick
            else " --accuracy-control"
        )
        code, _ = self.lg(
            rec, "quantize", "quantize --artifact {out}/model" + control, check=False, out=self.out
        )
        if code != 0:
            self.precision = "fp32"
            rec.status, rec.note = "skipped", "INT8 gate refused: the stations run FP32"
            print("The INT8 gate refused the quantized model (see above): stations run FP32.")

    def configure(self, rec: StepRecord) -> None:
        """Copy the committed templates with this machine's absolute paths and broker port."""
        cfg = self.out / "config"
        (cfg / "stations").mkdir(parents=True, exist_ok=True)
        mosquitto = None if self.args.no_broker else find_mosquitto()
        if mosquitto is not None:
            self.broker = LocalBroker(mosquitto, self.out / "broker")
        for st in self.stations:
            st.frames = self._replay_folder(st)
            src = self.configs / "stations" / f"{st.station_id}.yaml"
            data = yaml.safe_load(src.read_text())
            data["model"] = str(self.out / "model")
            data["precision"] = self.precision
            data["prompt"]["image"] = str((src.parent / data["prompt"]["image"]).resolve())
            data["camera"]["path"] = str(self.out / "replay" / st.station_id)
            self._write_yaml(cfg / "stations" / src.name, data, src)
        site = yaml.safe_load((self.configs / "site.yaml").read_text())
        if self.broker is not None:
            site["broker"]["port"] = self.broker.port
        else:
            site.pop("broker", None)
            print(
                "mosquitto is not installed: the runtime will write events to its outbox and "
                "stdout (install it with `make broker`)."
            )
        self._write_yaml(cfg / "site.yaml", site, self.configs / "site.yaml")
        self.lg(rec, "validate", "validate-config {site}", site=cfg / "site.yaml")

    def _replay_folder(self, st: StationInfo) -> list[tuple[str, str]]:
        """Test images of the station's paper type, good and impurity interleaved, as frames."""
        test = self.sample / st.paper / "test"
        by_label = {d.name: sorted(d.iterdir()) for d in sorted(test.iterdir()) if d.is_dir()}
        good = by_label.pop("good", [])
        bad = [(lab, f) for lab, files in by_label.items() for f in files]
        order: list[tuple[str, Path]] = []
        for i in range(max(len(good), len(bad))):
            if i < len(good):
                order.append(("good", good[i]))
            if i < len(bad):
                order.append(bad[i])
        folder = self.out / "replay" / st.station_id
        folder.mkdir(parents=True, exist_ok=True)
        frames = []
        for i, (label, f) in enumerate(order):
            shutil.copyfile(f, folder / f"{i:03d}_{label}_{f.name}")
            frames.append((f.name, label))
        return frames

    @staticmethod
    def _write_yaml(path: Path, data: dict[str, Any], template: Path) -> None:
        head = f"# Written by the demo from {_rel(template)} (paths and port of this machine).\n"
        path.write_text(head + yaml.safe_dump(data, sort_keys=False))

    def calibrate(self, rec: StepRecord) -> None:
        for st in self.stations:
            self.lg(
                rec, f"calibrate-{st.station_id}",
                "calibrate --station {cfg}/stations/{sid}.yaml --folder {data}/train/good "
                "--defects {data}/test/impurity --target-far 0.01 --out {out}/calibration/{sid} "
                "--apply config --audit-log {cfg}/audit.jsonl "
                "--reason 'demo: thresholds from normal training images'",
                cfg=self.out / "config", out=self.out, sid=st.station_id,
                data=self.sample / st.paper,
            )  # fmt: skip

    def bundle(self, rec: StepRecord) -> None:
        keys, dist = self.out / "keys", self.out / "dist"
        self.version = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        self.bundle_file = dist / f"lineguard-{self.version}.tar.gz"
        self.lg(rec, "keygen", "bundle keygen --out {key} --force", key=keys / "signing.key")
        self.lg(
            rec, "bundle", "bundle build --artifact {out}/model --stations {out}/config/stations "
            "--site {out}/config/site.yaml --version {v} --sign {key} --out {file}",
            out=self.out, v=self.version, key=keys / "signing.key", file=self.bundle_file,
        )  # fmt: skip
        self.lg(
            rec, "verify", "bundle verify {file} --pubkey {key}.pub",
            file=self.bundle_file, key=keys / "signing.key",
        )  # fmt: skip

    def start_broker(self, rec: StepRecord) -> None:
        if self.broker is None:
            rec.status, rec.note = "skipped", "no mosquitto: outbox + stdout"
            self.transport = "from the runtime's stdout (no broker)"
            return
        rec.command = f"{self.broker.exe} -c {_rel(self.broker.folder / 'mosquitto.conf')}"
        self.broker.start()
        print(f"mosquitto listening on {self.broker.host}:{self.broker.port}")
        self.subscriber = Subscriber(
            self.broker.host,
            self.broker.port,
            "lineguard",
            self.seen,
            self.line.print_alert,
            record=self.out / "mqtt-messages.jsonl",
        ).start()
        self.transport = "over MQTT"
        self.line.mqtt = True
        print(
            "subscriber connected to lineguard/#: alerts are printed as they arrive, every "
            f"message is kept in {_rel(self.out / 'mqtt-messages.jsonl')}"
        )

    def install(self, rec: StepRecord) -> None:
        self.lg(
            rec, "install", "deploy install {file} --root {out}/edge --pubkey {key}",
            file=self.bundle_file, out=self.out, key=self.out / "keys" / "signing.key.pub",
        )  # fmt: skip
        self.lg(rec, "status", "deploy status --root {root}", root=self.out / "edge")

    def run_line(self, rec: StepRecord) -> None:
        site = self.out / "edge" / "current" / "site.yaml"
        rec.command = shown(["run", "--site", str(site)])
        log = self.logs / f"{len(self.steps):02d}-run.log"
        try:
            rec.note = self.line.run(site, log, self.args.run_timeout)
        except RuntimeError as exc:
            raise DemoError(f"{exc}; log: {_rel(log)}") from None

    def thresholds(self) -> None:
        """The thresholds the stations ran with (threshold/state, else the bundled configs)."""
        for st in self.stations:
            active = self.seen.thresholds.get(st.station_id)
            if not active:
                path = self.out / "edge" / "current" / "stations" / f"{st.station_id}.yaml"
                if path.is_file():
                    active = (yaml.safe_load(path.read_text()) or {}).get("thresholds") or {}
            st.thresholds = active or {}

    # ------------------------------------------------------------------ main

    def run(self) -> int:
        t0 = time.monotonic()
        if self.out.exists():
            keep = {"train"} if self.args.reuse_model else set()
            for child in self.out.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.logs.mkdir(parents=True, exist_ok=True)
        print(f"LineGuard demo: work folder {_rel(self.out)}/, logs in {_rel(self.logs)}/")
        failed: str | None = None
        try:
            self.step("Train a small OneNIP model on the sample line", self.train)
            self.step("Evaluate it on the sample test images", self.evaluate)
            self.step("Export ONNX + OpenVINO IR (parity gate)", self.export)
            self.step("Quantize the detector to INT8 (accuracy gate)", self.quantize)
            self.step("Write and validate the site and station configs", self.configure)
            self.step("Calibrate each station's thresholds on normal images", self.calibrate)
            self.step("Build, sign and verify a bundle", self.bundle)
            self.step("Start a local MQTT broker", self.start_broker)
            self.step("Install the bundle into an edge root (health-checked)", self.install)
            self.step("Run the line from `current` (folder-replay cameras)", self.run_line)
        except DemoError as exc:
            failed = str(exc)
        except KeyboardInterrupt:
            failed = "interrupted"
        finally:
            if getattr(self, "subscriber", None) is not None:
                self.subscriber.stop()
            if self.broker is not None:
                self.broker.stop()
        if failed is None and not self.seen.alerts:
            failed = "no defect alert was received"
        self.thresholds()
        rec = self.banner("Write the report")
        t1 = time.monotonic()
        report = write_report(
            self.out / "report.html",
            self.out,
            self.steps,
            self.stations,
            self.seen,
            self.transport,
        )
        rec.seconds = time.monotonic() - t1
        return self.summary(report, failed, time.monotonic() - t0)

    def summary(self, report: Path, failed: str | None, wall: float) -> int:
        n = len(self.seen.alerts)
        print(f"\nreport: {_rel(report)}")
        for st in self.stations:
            alerts = self.seen.alerts_of(st.station_id)
            hits = sum(1 for a in alerts if st.frame_of(a.payload)[1] != "good")
            bad = sum(1 for _, lab in st.frames if lab != "good")
            print(
                f"  {st.station_id}: {len(st.frames)} frames replayed, {len(alerts)} alert(s), "
                f"{hits} of {bad} impurity frames alerted, {len(alerts) - hits} false alarm(s)"
            )
        cpu = sum(s.cpu_seconds for s in self.steps)
        print(
            f"{n} defect alert(s) received {self.transport}; demo wall time {wall:.0f} s "
            f"({cpu:.0f} CPU s in the lineguard processes, {os.cpu_count()} CPU(s))"
        )
        if failed:
            print(f"DEMO FAILED: {failed}", file=sys.stderr)
            return 1
        return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lineguard.deploy.demo",
        description="Train, compress, bundle, install and run LineGuard on the sample line; "
        "print the defect alerts a subscriber receives; write OUT/report.html.",
    )
    p.add_argument("--out", default="demo-out", help="work folder (wiped first; default demo-out)")
    p.add_argument(
        "--configs",
        default=str(REPO / "configs" / "demo"),
        help="demo configs and sample line (default: the checkout's configs/demo)",
    )
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (quicker, weaker)")
    p.add_argument("--threads", type=int, help="training threads (default: CPU count, max 8)")
    p.add_argument("--no-broker", action="store_true", help="run without mosquitto")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run for tests: {QUICK_EPOCHS} epochs (unless --epochs), no evaluation, "
        "one INT8 scheme without accuracy control (weaker model, fewer or no alerts)",
    )
    p.add_argument(
        "--reuse-model",
        action="store_true",
        help="keep OUT and skip training when OUT/train/final.pt exists",
    )
    p.add_argument(
        "--run-timeout",
        type=float,
        default=180.0,
        help="seconds the runtime may take to replay every frame (default 180)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return Demo(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
