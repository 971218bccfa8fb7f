import json
import logging
import os
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest
from console_script import BIN

# Under pytest-xdist the workers share the cores: one torch thread each (and in the processes they
# start), else 2 workers x N threads oversubscribe the machine. Set before torch's first import.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
# triton's first import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny batches (faster than two on a shared 2-core
    machine); the count is restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- the CLI in its own process, and in this one ----------------------------------------------------


def cli_process(*args, check=True, env=None, cwd=None, timeout=300):
    """The console script in its own process (one torch thread), for tests whose subject is the
    process. ``env``: variables added to this process's. Returns the CompletedProcess."""
    proc = subprocess.run(
        [BIN, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dhkd-pipe {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def cli_here(*args, check=True, env=None, cwd=None):
    """The CLI in this process: no interpreter start-up or imports to pay, for tests that are not
    about the process. ``env``: variables set while it runs; ``cwd``: the folder it runs in.
    Returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from dhkd_pipe.cli import main

    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    finally:
        os.chdir(here)
    if check and result.exit_code != 0:
        raise AssertionError(
            f"dhkd-pipe {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.stderr[-3000:]}"
            f"\n{result.exception!r}"
        )
    return result


def invoke(args: list) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr). An exception other than the exit is a
    bug, not a user error, and is raised here with its traceback."""
    from click.testing import CliRunner

    from dhkd_pipe.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def accelerate_launch(*args, processes: int = 2, script: str | None = None, timeout: float | None = None):
    """``accelerate launch`` of ``script`` with ``args`` (by default the CLI, ``-m dhkd_pipe.cli``,
    with ``args`` its command line) as ``processes`` ranks on this machine, one torch thread each;
    fails the test with the ranks' stderr unless every rank exits 0. Returns the CompletedProcess."""
    # accelerate's `--cpu` launcher starts one process; torchrun's (`--multi_gpu`) on a machine
    # without a GPU gives MULTI_CPU (gloo) ranks, which is what we test
    launcher = ["launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    target = [script] if script is not None else ["-m", "dhkd_pipe.cli"]
    proc = subprocess.run(
        [os.path.join(os.path.dirname(BIN), "accelerate"), *launcher, *target, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# ---- a real S3 server (moto) on 127.0.0.1, for the tests of stores on object storage --------------

S3_BUCKET = "dhkd"


def _post(url: str, body: bytes):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 for the session (moto's state is per process, so one server
    serves every module), authentication on: an IAM user with an access key and an s3:* policy
    is created in the first (unauthenticated) requests, then every request must be signed with
    that key. Creates the bucket ``S3_BUCKET``; yields the environment that points a process at it
    (also set in this process while the session lasts)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://127.0.0.1:%d" % server.get_host_and_port()[1]
        _post(endpoint + "/moto-api/reset-auth", b"3")  # three requests without a signature, then IAM
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="dhkd")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="dhkd", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="dhkd")["AccessKey"]
        env = {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
        ).create_bucket(Bucket=S3_BUCKET)
        with pytest.MonkeyPatch.context() as mp_env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
                mp_env.delenv(name, raising=False)
            for name, value in env.items():
                mp_env.setenv(name, value)
            yield env
    finally:
        try:
            _post("http://127.0.0.1:%d/moto-api/reset-auth" % server.get_host_and_port()[1], b"inf")
        finally:
            server.stop()


# ---- read-only inputs built once per session (and once for all xdist workers) ---------------------


def built_once(tmp_path_factory, name: str, build) -> "os.PathLike":
    """The folder ``name`` filled by ``build(folder)`` once per test session. Under pytest-xdist the
    first worker builds it in the session's shared temp folder while the others wait on its lock.
    Tests only read it: a test that writes copies it into its own ``tmp_path`` first."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this run
    folder, done = base / name, base / f"{name}.built"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            with torch.random.fork_rng():  # the seeds a build sets do not leak into the tests
                build(folder)
            done.touch()
    return folder


def save_random_teacher(path, num_classes: int):
    """A resnet8 with the weights ``torch.manual_seed(0)`` gives: enough for the mechanics."""
    from dhkd_pipe.models import create_model

    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes).state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory):
    """A resnet8 digits teacher (10 classes) with seeded random weights."""
    return (
        built_once(tmp_path_factory, "random-teacher", lambda d: save_random_teacher(d / "model.pt", 10)) / "model.pt"
    )


@pytest.fixture(scope="session")
def random_teacher3(tmp_path_factory):
    """A resnet8 with seeded random weights for the 3 classes of ``digit_jpegs``."""
    return (
        built_once(tmp_path_factory, "random-teacher3", lambda d: save_random_teacher(d / "resnet8.pt", 3))
        / "resnet8.pt"
    )


def write_digit_jpegs(root, classes=3, train=8, val=2):
    """scikit-learn digits as JPEGs of varied, non-square sizes: train/classC/KKK.JPEG and val/classC."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        if label >= classes or counts.get(label, 0) >= train + val:
            continue
        k = counts[label] = counts.get(label, 0) + 1
        split = "val" if k > train else "train"
        pixels = (image / 16 * 255).astype(np.uint8)
        size = (40 + 4 * (k % 3), 48 - 4 * (k % 2))
        rgb = Image.fromarray(pixels).resize(size, Image.BILINEAR).convert("RGB")
        os.makedirs(root / split / f"class{label}", exist_ok=True)
        rgb.save(root / split / f"class{label}" / f"{k:03d}.JPEG", quality=95)
    return root


ENTROPY_DAMAGE = ("noise", "zeros", "marker", "cut")


def damage_jpeg_entropy(path, kind: str = "noise", at: float = 0.5):
    """Damages a JPEG's entropy-coded data (after the scan header, ``at`` of the way through it) and
    keeps its headers and end marker: 24 random bytes, 24 zeros, a stray end-of-image marker, or 8
    bytes cut out. libjpeg decodes each with a warning, and grey where it lost its place. (Not
    every cut is seen: one that leaves a stream of whole codes decodes garbage without a word.)"""
    data = bytearray(open(path, "rb").read())
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    mid = start + int((len(data) - 2 - start) * at)
    if kind == "noise":
        data[mid : mid + 24] = np.random.default_rng(1).integers(1, 250, 24).astype(np.uint8).tobytes()
    elif kind == "zeros":
        data[mid : mid + 24] = bytes(24)
    elif kind == "marker":
        data[mid : mid + 2] = b"\xff\xd9"
    elif kind == "cut":
        del data[mid : mid + 8]
    else:
        raise ValueError(f"unknown damage {kind!r}")
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


@pytest.fixture(scope="session")
def digit_jpegs(tmp_path_factory):
    """An image folder of digits: 3 classes, 24 training and 6 validation JPEGs of varied sizes."""
    return built_once(tmp_path_factory, "digit-jpegs", lambda d: write_digit_jpegs(d / "data")) / "data"


# The digits stores of the pipeline tests: views 2, seed 0, batches of 64, chunks of 256 rows.
DIGITS_STORE = dict(data="digits", model="resnet8", views=2, seed=0, batch_size=64, chunk_rows=256)


def write_digits_store(teacher, out, **kw):
    from dhkd_pipe.config import CacheConfig
    from dhkd_pipe.stages.cache_teacher import cache_teacher

    cache_teacher(
        CacheConfig(**{**DIGITS_STORE, "weights": str(teacher), "out": str(out), **kw}).validate(), log=lambda *a: None
    )
    return out


@pytest.fixture(scope="session")
def quick_store(tmp_path_factory, random_teacher):
    """The digits store of ``random_teacher``."""
    return (
        built_once(tmp_path_factory, "quick-store", lambda d: write_digits_store(random_teacher, d / "logits.zarr"))
        / "logits.zarr"
    )


# A smaller one for tests that train many short runs: 256 training images in chunks of 64, 8 steps an epoch at batch 32.
SMALL_DATA = "digits@256"


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, random_teacher):
    """The ``SMALL_DATA`` store of ``random_teacher`` (2 views)."""
    return (
        built_once(
            tmp_path_factory,
            "small-store",
            lambda d: write_digits_store(random_teacher, d / "logits.zarr", data=SMALL_DATA, chunk_rows=64),
        )
        / "logits.zarr"
    )


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory):
    """A small digits teacher trained through the CLI (in this process): 3 epochs of resnet8."""

    def build(folder):
        from click.testing import CliRunner

        from dhkd_pipe.cli import main

        out = folder / "run"
        result = CliRunner().invoke(
            main,
            [
                "train-teacher",
                "--model",
                "resnet8",
                "--data",
                "digits",
                "--epochs",
                "3",
                "--lr",
                "0.1",
                "--lr-milestones",
                "2",
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["val_top1"] > 50  # 3 epochs of resnet8 (66% here): far above chance (10%)

    return built_once(tmp_path_factory, "trained-teacher", build) / "run" / "model.pt"


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory, trained_teacher):
    """The digits store of ``trained_teacher``."""
    return (
        built_once(tmp_path_factory, "trained-store", lambda d: write_digits_store(trained_teacher, d / "logits.zarr"))
        / "logits.zarr"
    )


# Files whose tests start several processes or train for epochs, longest first. Each test process
# (pytest-xdist, --dist loadfile) takes whole files in collection order, so the longest files go
# first: started last, one of them would run alone while the other process sits idle.
LONGEST_FIRST = (
    "test_multi_machine.py",
    "test_lost_machine.py",
    "test_faults_store.py",
    "test_faults.py",
    "test_students.py",
    "test_tune.py",
    "test_pipeline.py",
    "test_store_s3.py",
    "test_decode_once.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
