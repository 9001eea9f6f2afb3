"""A training entry point that fails at once: `--module tests.launch_fixtures.crash`."""

import sys

if __name__ == "__main__":
    print(f"crash fixture started with {sys.argv[1:]}", flush=True)
    raise RuntimeError("launch test: simulated crash")
