"""Drop-in use of scale_fast's losses inside other libraries' models and training code.

Each submodule imports its library only when it is itself imported: scale_fast needs none of them.
"""
