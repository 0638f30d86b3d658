"""The automatic search for the refusal-vs-KL front: `space` (what a trial may choose and the plan
of its choice), `scoring` (a plan scored at inference time on held-out prompts), `study` (the Optuna
study, resumable in SQLite, its front and the chosen trial), `experts` (MoE routing profiles: which
experts the router_bias component may suppress)."""
