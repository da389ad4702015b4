"""Go tools the tests run beside our code, built once and cached outside the repository.

The cache is `$EPP_TOOLS_DIR` or `~/.cache/epp-tools`; binaries are named with their
version (`bin/llm-d-inference-sim-v0.10.2`), so a version bump rebuilds and CI can cache
the directory between runs. Build ahead of the tests with

    python -m tests.tools build        # or: make tools (if the Makefile has it)

A test calls `require(TOOL)`: it returns the binary's path, building it first if needed;
it skips the test only when no Go toolchain is installed, and fails it (with the build
log) when a build fails, since that is a real problem to fix, not a missing extra.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILD_TIMEOUT = 1800.0  # a cold build downloads and compiles ~200 modules (~4 min here)


@dataclass(frozen=True)
class GoTool:
    binary: str
    module: str
    package: str
    """Path of the main package inside the module."""
    version: str

    @property
    def install_path(self) -> str:
        return f"{self.module}/{self.package}@{self.version}"


LLM_D_INFERENCE_SIM = GoTool(
    binary="llm-d-inference-sim",
    module="github.com/llm-d/llm-d-inference-sim",
    package="cmd/llm-d-inference-sim",
    version="v0.10.2",
)

ALL_TOOLS = (LLM_D_INFERENCE_SIM,)


class GoMissing(RuntimeError):
    """No Go toolchain on this machine."""


class BuildFailed(RuntimeError):
    """The toolchain is there but the build did not work; the message holds the log."""


def tools_dir() -> Path:
    return Path(os.environ.get("EPP_TOOLS_DIR") or Path.home() / ".cache" / "epp-tools")


def tool_path(tool: GoTool) -> Path:
    return tools_dir() / "bin" / f"{tool.binary}-{tool.version}"


def go_binary() -> str:
    """The `go` command, from PATH or the usual install location."""
    found = shutil.which("go") or (
        "/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None
    )
    if not found:
        raise GoMissing("no Go toolchain (`go` not on PATH or in /usr/local/go/bin)")
    return found


def ensure(tool: GoTool) -> Path:
    """The tool's binary, built into the cache first if it is not there yet."""
    out = tool_path(tool)
    if out.is_file() and os.access(out, os.X_OK):
        return out
    go = go_binary()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{tool.binary}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test workers)
        if out.is_file():
            return out
        _build(go, tool, out)
    return out


def _build(go: str, tool: GoTool, out: Path) -> None:
    # Pure Go (CGO off): the simulator's tokenizer bindings are not needed with
    # --force-dummy-tokenizer, and this avoids needing a C toolchain.
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS=os.environ.get("GOFLAGS", "-buildvcs=false"))
    logs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="epp-gobin-") as tmp:
        # 1. The ordinary way.
        _, log = _run([go, "install", tool.install_path], env=dict(env, GOBIN=tmp))
        logs.append(log)
        built = Path(tmp) / tool.binary
        if not built.is_file():
            # 2. `go install m@v` also asks the proxy for the module's version list (to
            # report deprecation); some proxies refuse that. Download the one version and
            # build it in place instead.
            stdout, log = _run([go, "mod", "download", "-json", f"{tool.module}@{tool.version}"],
                               env=env, cwd=tmp)
            logs.append(log)
            try:
                src = json.loads(stdout)["Dir"]
            except (ValueError, KeyError, TypeError):
                raise BuildFailed("\n".join(logs)) from None
            logs.append(_run([go, "build", "-o", str(built), f"./{tool.package}"], env=env,
                             cwd=src)[1])
        if not built.is_file():
            raise BuildFailed("\n".join(logs))
        tmp_out = out.with_suffix(".partial")
        shutil.copy2(built, tmp_out)
        os.replace(tmp_out, out)


def _run(cmd: list[str], env: dict[str, str], cwd: str | None = None) -> tuple[str, str]:
    """Run a build step: (its stdout, a log of '$ cmd (exit N)' and all output).

    Never raises on failure: the caller checks for the file it expected.
    """
    try:
        p = subprocess.run(cmd, check=False, env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT)
        stdout, output, status = p.stdout, p.stdout + p.stderr, f"(exit {p.returncode})"
    except subprocess.TimeoutExpired:
        stdout, output, status = "", "", f"(timed out after {BUILD_TIMEOUT:.0f}s)"
    return stdout, f"$ {' '.join(cmd)} {status}\n{output}"


def require(tool: GoTool) -> Path:
    """For tests: the binary, or pytest.skip when Go is absent (a failed build fails)."""
    import pytest

    try:
        return ensure(tool)
    except GoMissing as e:
        pytest.skip(f"{tool.binary} {tool.version} needs the Go toolchain: {e}")
    except BuildFailed as e:
        pytest.fail(f"building {tool.install_path} failed:\n{e}")


def main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m tests.tools build", file=sys.stderr)
        return 2
    for tool in ALL_TOOLS:
        try:
            print(ensure(tool))
        except GoMissing as e:
            print(f"skipping {tool.binary}: {e}", file=sys.stderr)
        except BuildFailed as e:
            print(f"building {tool.install_path} failed:\n{e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
