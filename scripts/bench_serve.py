"""Throughput of `sdkd serve` with concurrent clients: --max-batch 1 (one request at a time)
against --max-batch N, side by side (docs/benchmarks.md, "Serving").

usage: bench_serve.py --model PIPELINE_DIR [--clients 8] [--requests-per-client 2] [--rounds 3]
                      [--max-batch 8] [--size 64] [--steps 20] [--sdkd target/release/sdkd]

Each round starts a server per setting, alternating (A/B/A/B, so both see the same load on a
shared machine), sends one warm-up request, then lets CLIENTS threads each send their requests
one after another (same size, steps and scheduler, so they can batch; each its own seed and
prompt) and times from the first send to the last answer. It prints images/s per round and the
medians, and the speed-up max-batch N / max-batch 1, and the server's CPU seconds (user +
system, all threads, from /proc) per image: on a shared machine the steadier figure. Python's
standard library only.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time


def start(sdkd, model, db, max_batch, log):
    proc = subprocess.Popen([sdkd, "serve", "--model", model, "--db", db, "--listen", "127.0.0.1:0", "--device", "cpu",
                             "--max-batch", str(max_batch), "--max-queue", "256"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    addr = line.split("http://")[1].split()[0]
    host, port = addr.rsplit(":", 1)
    return proc, host, int(port)


def post(host, port, key, body):
    conn = http.client.HTTPConnection(host, port, timeout=3600)
    conn.request("POST", "/v1/txt2img", json.dumps(body), {"x-api-key": key, "content-type": "application/json"})
    answer = conn.getresponse()
    answer.read()
    conn.close()
    if answer.status != 200:
        raise RuntimeError(f"status {answer.status}")


def body(args, seed):
    return {"prompt": f"a toy panda, number {seed}", "seed": seed, "img_width": args.size, "img_height": args.size,
            "num_inference_steps": args.steps, "base64": False}


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_trip(args, max_batch, db, key, log):
    proc, host, port = start(args.sdkd, args.model, db, max_batch, log)
    try:
        post(host, port, key, body(args, 0))  # warm-up
        errors = []

        def client(c):
            try:
                for r in range(args.requests_per_client):
                    post(host, port, key, body(args, 1 + c * args.requests_per_client + r))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        t, cpu = time.perf_counter(), cpu_seconds(proc.pid)
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed, cpu = time.perf_counter() - t, cpu_seconds(proc.pid) - cpu
        if errors:
            raise RuntimeError(f"--max-batch {max_batch}: {errors[0]}")
        images = args.clients * args.requests_per_client
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("GET", "/metrics")
        metrics = dict(line.split() for line in conn.getresponse().read().decode().splitlines() if line.startswith("sdkd_batch_size_"))
        mean_batch = float(metrics["sdkd_batch_size_sum"]) / float(metrics["sdkd_batch_size_count"])  # warm-up included
        return images / elapsed, cpu / images, mean_batch
    finally:
        proc.terminate()
        proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--sdkd", default="target/release/sdkd")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "keys.sqlite")
        key = subprocess.run([args.sdkd, "keys", "add", "--db", db, "--name", "bench", "--credits", "1000000000"],
                             check=True, capture_output=True, text=True).stdout.strip()
        rates, cpus = {1: [], args.max_batch: []}, {1: [], args.max_batch: []}
        with open(os.path.join(tmp, "serve.log"), "w") as log:
            for r in range(args.rounds):
                for mb in (1, args.max_batch):
                    rate, cpu, mean_batch = round_trip(args, mb, db, key, log)
                    rates[mb].append(rate)
                    cpus[mb].append(cpu)
                    print(f"round {r + 1}: --max-batch {mb}: {rate:.3f} images/s, {cpu:.3f} CPU s/image, {mean_batch:.1f} requests per generation", flush=True)
    one, many = statistics.median(rates[1]), statistics.median(rates[args.max_batch])
    speedups = [b / a for a, b in zip(rates[1], rates[args.max_batch])]
    print(f"{args.clients} clients x {args.requests_per_client} requests, {args.size}x{args.size}, {args.steps} steps, "
          f"{args.rounds} rounds: --max-batch 1 {one:.3f} images/s, --max-batch {args.max_batch} {many:.3f} images/s, "
          f"{many / one:.2f}x (per round {min(speedups):.2f}-{max(speedups):.2f}x); CPU s/image "
          f"{statistics.median(cpus[1]):.3f} and {statistics.median(cpus[args.max_batch]):.3f}")


if __name__ == "__main__":
    main()
