"""Op definitions: one file per op family holds its schema, fake kernel, autograd, autocast policy,
validation and backend dispatch. Backend implementations live in ``ptfast.backends.<backend>.<op>``."""
