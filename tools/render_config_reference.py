"""Write docs/configuration.md from the config dataclasses: python tools/render_config_reference.py"""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from megatron_medmoe.config.reference import render_reference  # noqa: E402

if __name__ == "__main__":
    path = os.path.join(ROOT, "docs", "configuration.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_reference())
    print(f"wrote {path}")
