"""The SeRA algorithm in pure torch: log-probs, DAA losses, implicit rewards, selection and
preference bootstrapping. Nothing here knows of Ray."""
