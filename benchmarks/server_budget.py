"""What a refused over-budget request costs the server process: peak RSS above its idle RSS, RSS left afterwards,
and CPU seconds, read from /proc of a `serve()` process started on 127.0.0.1 (one fresh server per case).

Two tiny checkpoints with 448 px tiles (256 tokens each): `ctx512`, a 512-token context (the test checkpoint's),
and `ctx32k`, a 32768-token context (InternVL2.5/3's). Cases, `case@checkpoint`:
- `images`: twelve solid 3584x2240 PNGs of different colours (about 28 KB each) at `max_tiles` 40: 492 tiles;
  over the context on both checkpoints (and over the 128-tile default cap);
- `video`: a 3840x2160 H.264 clip of 64 identical solid frames (about 27 KB), `num_frames` 64: over the 512-token
  context; within budget at 32k (answered, so this shows what a 4K clip holds while it is being decoded);
- `text_10mb`: one 10 MB text message; `text_45mb` (only with --huge): 45 MB, under the 50 MB body limit;
- `within_budget`: one small image, answered (the reference for an ordinary request).

`--source DIR` runs the server from another checkout's `mlx_internvl` (e.g. main's), in the same venv; the figures
go under `--label` in the results JSON (other labels already there are kept). A watchdog kills a server whose RSS
passes `--rss-limit-gb` and records that.

    python benchmarks/server_budget.py --source /work/main --label main
    python benchmarks/server_budget.py --label budget
    python benchmarks/server_budget.py --table      # the JSON's labels side by side, as Markdown
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SERVER = """
import sys
sys.path.insert(0, sys.argv[1])
import mlx_internvl
from mlx_internvl.server.app import serve
print("SOURCE " + mlx_internvl.__file__, file=sys.stderr, flush=True)
serve(sys.argv[2], port=int(sys.argv[3]), dtype="float32", model_name="tiny", max_tokens=4)
"""
TICK = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(width: int, height: int, colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def h264(path: Path, width: int, height: int, frames: int) -> bytes:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        rgb = np.full((height, width, 3), (30, 90, 200), dtype=np.uint8)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def cases(tmp: Path, huge: bool) -> dict:
    def chat(parts, text="Describe.", **extra):
        content = [{"type": "text", "text": text}] + parts
        return dict({"model": "tiny", "messages": [{"role": "user", "content": content}]}, **extra)

    colours = [(20 * i, 255 - 20 * i, 128) for i in range(12)]
    images = [{"type": "image_url", "image_url": {"url": url(png(3584, 2240, c), "image/png")}} for c in colours]
    clip = h264(tmp / "clip.mp4", 3840, 2160, 64)
    out = {
        "images@ctx512": ("ctx512", chat(images, max_tiles=40)),
        "images@ctx32k": ("ctx32k", chat(images, max_tiles=40)),
        "video@ctx512": ("ctx512", chat([{"type": "video_url", "video_url": {"url": url(clip, "video/mp4")}}],
                                        num_frames=64)),
        "video@ctx32k": ("ctx32k", chat([{"type": "video_url", "video_url": {"url": url(clip, "video/mp4")}}],
                                        num_frames=64)),
        "text_10mb@ctx512": ("ctx512", {"model": "tiny", "messages": [{"role": "user",
                                                                        "content": "word " * (2 << 20)}]}),
        "within_budget@ctx32k": ("ctx32k", chat([{"type": "image_url", "image_url": {
            "url": url(png(448, 448, (9, 99, 199)), "image/png")}}], max_tiles=1)),
    }
    if huge:
        out["text_45mb@ctx512"] = ("ctx512", {"model": "tiny", "messages": [{"role": "user",
                                                                         "content": "word " * (9 << 20)}]})
    sizes = {"images": f"12 PNGs of {len(images[0]['image_url']['url']) * 3 // 4 >> 10} KB",
             "video": f"{len(clip) >> 10} KB of H.264"}
    return out, sizes


def post(base: str, body: dict, timeout: float):
    data = json.dumps(body).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r), len(data)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), len(data)


def measure(source: Path, ckpt: Path, body: dict, limit_mb: float) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(source), str(ckpt), str(port)],
                              stderr=subprocess.PIPE, text=True, cwd=source)
    base = f"http://127.0.0.1:{port}"
    try:
        origin = server.stderr.readline().strip()
        assert origin.startswith("SOURCE " + str(source)), origin
        threading.Thread(target=server.stderr.read, daemon=True).start()  # drain
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        time.sleep(0.5)
        with open(f"/proc/{server.pid}/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        idle, cpu0 = proc_status(server.pid)["VmRSS"], cpu_s(server.pid)
        killed, done = threading.Event(), threading.Event()

        def watchdog():
            while server.poll() is None and not done.is_set():
                if proc_status(server.pid).get("VmRSS", 0) > limit_mb:
                    killed.set()
                    server.kill()
                    return
                time.sleep(0.05)

        threading.Thread(target=watchdog, daemon=True).start()
        t = time.monotonic()
        try:
            status, reply, sent = post(base, body, timeout=600)
        except OSError as e:
            status, reply, sent = None, {"error": {"message": str(e)}}, 0
        seconds = time.monotonic() - t
        done.set()
        if killed.is_set():
            return {"status": None, "killed_over_mb": limit_mb, "seconds": round(seconds, 2)}
        time.sleep(0.3)
        st = proc_status(server.pid)
        err = reply.get("error") or {}
        return {"status": status, "code": err.get("code"), "message": (err.get("message") or "")[:160],
                "body_kb": sent >> 10, "seconds": round(seconds, 2), "idle_rss_mb": round(idle),
                "peak_above_idle_mb": round(st["VmHWM"] - idle), "left_above_idle_mb": round(st["VmRSS"] - idle),
                "cpu_s": round(cpu_s(server.pid) - cpu0, 2)}
    finally:
        server.kill()
        server.wait()


def table(results: dict) -> str:
    """One row per case and label: status, peak RSS above idle, RSS left, CPU seconds."""
    rows = ["| Case | Run | Status | Peak RSS above idle (MB) | Left resident (MB) | CPU (s) |",
            "|---|---|---|---|---|---|"]
    names = dict.fromkeys(n for run in results.values() for n in run["cases"])
    for name in names:
        for label, run in results.items():
            r = run["cases"].get(name)
            if r is None:
                continue
            if r.get("killed_over_mb"):
                rows.append(f"| {name} | {label} | killed past {r['killed_over_mb'] / 1024:g} GB | - | - | - |")
                continue
            status = f"{r['status']} {r['code'] or ''}".strip()
            rows.append(f"| {name} | {label} | {status} | {r['peak_above_idle_mb']} | {r['left_above_idle_mb']} "
                        f"| {r['cpu_s']} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT, help="checkout whose mlx_internvl serves (default: this)")
    ap.add_argument("--label")
    ap.add_argument("--table", action="store_true", help="print the results JSON as a Markdown table and stop")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server-budget-linux-cpu.json")
    ap.add_argument("--huge", action="store_true", help="also the 45 MB text case")
    ap.add_argument("--only", nargs="*", help="case names to run")
    ap.add_argument("--rss-limit-gb", type=float, default=8.0)
    args = ap.parse_args()
    if args.table or not args.label:
        print(table(json.loads(args.out.read_text())))
        return
    from builders import Case, build

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpts = {"ctx512": build(Case("budget_512", image_size=448), tmp / "c512").original_dir,
                 "ctx32k": build(Case("budget_32k", image_size=448, extra_text={"max_position_embeddings": 32768}),
                                 tmp / "c32k").original_dir}
        bodies, sizes = cases(tmp, args.huge)
        results = {}
        for name, (ckpt, body) in bodies.items():
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            results[name] = dict(measure(args.source.resolve(), ckpts[ckpt], body, args.rss_limit_gb * 1024),
                                 sent=sizes.get(name.split("@")[0], ""))
            print(name, json.dumps(results[name]), flush=True)
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    stored[args.label] = dict(stored.get(args.label, {}), source=str(args.source))
    stored[args.label]["cases"] = dict(stored[args.label].get("cases", {}), **results)
    args.out.write_text(json.dumps(stored, indent=1) + "\n")


if __name__ == "__main__":
    main()
