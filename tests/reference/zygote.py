"""A pre-imported Python for the test binaries' reference runs.

Importing torch, diffusers (which pulls in torch._dynamo and, with peft installed, peft) and
transformers costs several seconds of CPU per interpreter, more than most reference scripts
compute. This server imports them once, then forks a child per request: the child runs the
script as `python script args...` would (argv, cwd, environment, stdout/stderr into the files
the client names, `__main__`), and the server stays as it was for the next one. The child's
RNGs are seeded from the OS as a fresh interpreter's are, so a reference run here behaves as one in a new
process.

usage: zygote.py SOCKET_PATH  (tests/common/mod.rs starts it; SDKD_TEST_ZYGOTE=0 turns it off)

Protocol, one request per connection: the client sends a JSON line {argv, cwd, env, stdout,
stderr}; the forked child answers its exit code as a line.
The server exits after IDLE_S seconds without a request and without a running child.
"""
import json
import os
import signal
import socket
import sys
import time

IDLE_S = 60

# The imports every reference run pays for; nothing here may start a thread or an OpenMP pool
# (a forked child would inherit a pool without its threads).
import torch  # noqa: E402
import numpy  # noqa: E402,F401
import PIL.Image  # noqa: E402,F401
import safetensors.torch  # noqa: E402,F401
import diffusers  # noqa: E402

for name in ("UNet2DConditionModel", "AutoencoderKL", "StableDiffusionPipeline", "StableDiffusionXLPipeline",
             "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "LCMScheduler"):
    getattr(diffusers, name)
import transformers  # noqa: E402

for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"):
    getattr(transformers, name)
import diffusers.utils.torch_utils  # noqa: E402,F401


def run_child(request):
    """In the forked child: become `python argv...` and return its exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    # a fresh interpreter seeds these from the OS; so does each child, not with the server's state
    torch.seed()
    numpy.random.seed(None)
    import random
    random.seed()
    argv = request["argv"]
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            import runpy
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    try:
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main():
    path = sys.argv[1]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    server.bind(tmp)
    server.listen(64)
    os.rename(tmp, path)  # clients connect only once everything above is imported
    server.settimeout(1.0)
    children = {}  # pid -> (what it runs, start)
    last = time.monotonic()
    print(f"zygote {os.getpid()}: ready after {time.process_time():.1f} s of CPU", flush=True)
    while True:
        while children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            what, start = children.pop(pid)
            last = time.monotonic()
            print(f"{what}: exit {os.waitstatus_to_exitcode(status)}, {last - start:.1f} s, "
                  f"{usage.ru_utime + usage.ru_stime:.1f} s of CPU", flush=True)
        if not children and time.monotonic() - last > IDLE_S:
            break
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        request = json.loads(conn.makefile("rb").readline())
        last = time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            server.close()
            code = 1
            try:
                code = run_child(request)
            finally:
                try:
                    conn.sendall(f"{code}\n".encode())
                finally:
                    os._exit(code if 0 <= code < 256 else 1)
        children[pid] = (" ".join(os.path.basename(a) for a in request["argv"][:1]), time.monotonic())
        conn.close()
    os.unlink(path)  # a client that connected meanwhile reads no code and runs Python itself


if __name__ == "__main__":
    main()
