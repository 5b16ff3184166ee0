"""Memory profiles, split by job: `rows` (which rows a profile has, and the documented fields of one),
`measure` (one row's step, real and/or on fake tensors, through `session.build` and `session.train_step`), `report`
(Markdown, the reading, the PNG). `sidetune.profile` is the command; `sidetune.memory` has the trackers."""
