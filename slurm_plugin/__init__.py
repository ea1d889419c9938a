"""The Slurm face of dynprov: `dynprov-slurm` (config, node-side helper, reboot, resume, suspend).

Translation only: Slurm's words (features, RebootProgram, ResumeProgram) into toolkit calls, all
of which go through ``slurm_plugin.toolkit`` (one adapter, one place to rewire).
"""
