"""The embedded demo: a world of coloured shapes to train and judge the tiny base and hypernetworks on."""
