"""The project's model: a factory distaccum calls with the config's `model_args`."""

import keras


def build_model(hidden_units: int = 32, num_classes: int = 2) -> keras.Model:
    """A small classifier, compiled as the team compiles it: distaccum keeps the loss, the
    metrics and the optimizer (its learning rate included)."""
    model = keras.Sequential([
        keras.Input((30,)),
        keras.layers.Dense(hidden_units, activation="relu"),
        keras.layers.Dense(num_classes),
    ], name="tumour_classifier")
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model
