"""Format adapters at the edges: the reference implementation's format in, mergekit's out.

:mod:`auto_merge.merge` speaks only its own recipe schema (:mod:`auto_merge.merge.recipe`); the modules here translate
other formats into it or out of it:

- :mod:`auto_merge.formats.reference_recipe`: the reference implementation's slice recipes
  (``merging_method: {METHOD: {PARAM: [{filter, value}]}}``) into the recipe schema (see ``docs/reference_format.md``);
- :mod:`auto_merge.formats.mergekit`: a recipe out as mergekit YAML (``mergekit-yaml`` / ``mergekit-multi``).
"""
