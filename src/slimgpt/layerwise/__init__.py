"""Layer 3: what every layer-by-layer method shares.

capture: layer-0 inputs, batch running, dense statistics, the activation store; passes: the statistics
and propagation passes of a head/channel layer; checkpoint: per-layer progress on disk; run: the loop
(resume, progress, device round trip, checkpoint commit) and report assembly.
"""
