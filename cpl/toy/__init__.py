"""The toy reasoning world (`world`), the embedded default planner's training (`train_planner`) and its
evaluation (`evaluate.evaluate_planner`); see docs/toy-world.md."""
