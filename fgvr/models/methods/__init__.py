"""Region methods with a forward of their own (config group `method`): TransFG, FFVT and IELT
select tokens inside a ViT's encoder, CAL attends, crops and drops on a CNN. Each is one module
(`Method`) that maps normalised images to logits and, in training, its named loss terms."""
