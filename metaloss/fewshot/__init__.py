"""Few-shot learning with learned inner losses: MAML's inner loop over episodes
(:mod:`metaloss.fewshot.maml`) and the losses it can adapt with, fixed, ML3-style or
task-adaptive (MeTAL) (:mod:`metaloss.fewshot.losses`). Episodes: :mod:`metaloss.tasks.episodes`.
"""
