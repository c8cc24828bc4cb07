"""``gradcomp recipes``: list the built-in recipes (or show one as JSON)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("recipes", help="list built-in training recipes",
                       description="List the built-in recipes, or print one as JSON (the same "
                       "fields a .json/.toml recipe file takes).")
    p.add_argument("name", nargs="?", help="show this recipe as JSON")
    return p


def run(args) -> int:
    from gradcomp.apps.recipes import get_recipe, list_recipes
    from gradcomp.apps.tables import to_json

    if args.name:
        print(to_json(get_recipe(args.name).to_dict()))
        return 0
    for name in list_recipes():
        desc = get_recipe(name).description
        if len(desc) > 100:  # the long paper recipes: `gradcomp recipes NAME` shows it all
            desc = desc[:97] + "..."
        print(f"{name:18s} {desc}")
    return 0
