"""How hostile chat templates end: each is rendered in a forked child (20 s deadline, 4 GiB address cap),
and the table gives the outcome, the seconds and the child's peak memory.

    python benchmarks/chat_template_bounds.py
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import time

TEMPLATES = {
    "range(10**9) loop": "{% for i in range(10**9) %}x{% endfor %}",
    "nested range loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "nested loops, output": "{% for i in range(99999) %}{% for j in range(99999) %}xy{% endfor %}{% endfor %}",
    "'x' * 10**10": "{{ 'x' * 10**10 }}",
    "list * 10**6": "{{ (range(1000) | list) * 10**6 }}",
    "'x'.ljust(10**10)": "{{ 'x'.ljust(10**10) }}",
    "replace amplification": "{{ ('x' * 99999) | replace('x', 'y' * 99999) }}",
    "'%0999999999d' | format": "{{ '%0999999999d' | format(1) }}",
    "str.format width": "{{ '{:>9999999999}'.format(1) }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s | length }}",
    "branching macro": "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                       "{{ f(40) }}",
    "center(10**10)": "{{ 'x' | center(10**10) }}",
}


def child(template: str, wfd: int) -> None:
    from dgrun.chat_template import render
    from dgrun.errors import DgrunError

    vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), resource.RLIM_INFINITY))
    try:
        out = render(template, [{"role": "user", "content": "hi"}])
        result = f"rendered {len(out)} chars"
    except DgrunError as e:
        result = f"DgrunError: {str(e)[:90]}"
    except BaseException as e:  # noqa: BLE001
        result = f"{type(e).__name__}: {str(e)[:80]}"
    peak = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM")) // 1024
    os.write(wfd, json.dumps([result, peak]).encode())
    os._exit(0)


def run(template: str, timeout: float = 20.0):
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child(template, w)
    os.close(w)
    ready, _, _ = select.select([r], [], [], timeout)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return f"still running after {timeout:.0f} s (killed)", time.perf_counter() - t0, None
    data = os.read(r, 65536)
    os.waitpid(pid, 0)
    seconds = time.perf_counter() - t0
    if not data:
        return "child died", seconds, None
    result, peak = json.loads(data)
    return result, seconds, peak


def main() -> None:
    import dgrun.chat_template  # noqa: F401  (imported before forking, so children start warm)

    base = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmRSS")) // 1024
    print(f"| template | outcome | seconds | peak RSS (MiB; parent {base}) |\n|---|---|---|---|")
    for name, template in TEMPLATES.items():
        result, seconds, peak = run(template)
        print(f"| {name} | {result} | {seconds:.2f} | {peak if peak is not None else '-'} |", flush=True)


if __name__ == "__main__":
    main()
