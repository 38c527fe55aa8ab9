"""`python -m fhir_facade` = the `fhir-facade` command."""

import sys

from fhir_facade.cli import main

sys.exit(main())
