"""Readers and writers of other codes' files: ABINIT DDB, MULTIBINIT system/coefficient XML and HIST trajectories;
JSON files written atomically (jsonfile)."""
