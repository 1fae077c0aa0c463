"""One module per stage of the lineage graph: base_model → curated_dataset → lora_adapter → evaluation_report."""
