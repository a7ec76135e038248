"""The stages a study runs on every run's checkpoints, in order (each declared in its own module)."""
from eqlab.pipeline import conservation_stage, findings_stage, identities, spectra_stage

STAGES = (spectra_stage.STAGE, identities.STAGE, conservation_stage.STAGE,
          findings_stage.STAGE)
