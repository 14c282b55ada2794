"""The whole pipeline from one YAML (`miniplm run`) and its plan before any work (`miniplm plan`)."""
