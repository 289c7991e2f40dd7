from .smoothing_fit import main

main()
