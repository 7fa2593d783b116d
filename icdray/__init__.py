"""icdray: Ray-native training and serving of LLM medical coders (ICD-10-CM from discharge notes).

Modules in pipeline order: codes -> notes -> mimic -> demo_data -> prepare -> prompts -> metrics ->
baseline. Importing the package is cheap: heavy libraries load inside the functions that need them.
"""

__version__ = "0.1.0"
