"""`python -m lmmarg`: the main job — a marginalized NUTS fit of sleepstudy, printing the posterior summary."""
from .demo import main

if __name__ == "__main__":
    main()
