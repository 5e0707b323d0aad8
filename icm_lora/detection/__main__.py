"""``python -m icm_lora.detection``: the detection domain's CLI."""

from .cli import main

main()
