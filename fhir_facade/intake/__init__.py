"""Bringing studies in and sending them out: de-identification (`deidentify*`) and the deletion of a
study (`study_delete`), among the intake operations of issue 16."""
