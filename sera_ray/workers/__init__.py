"""Ray actors for the roles of a SeRA run: generators, scorers and learners."""
