"""Engine-settings tuning: search spaces, trials, studies, landscapes."""
